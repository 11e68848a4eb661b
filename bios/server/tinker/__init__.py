"""Wire compatibility with the official Tinker Python SDK (PyPI `tinker`, tested with 0.33.1 and 0.38.0).

`tinker.ServiceClient(base_url=<bios serve URL>, api_key=<a Bios key, tml-...>)` works against
`bios serve`: `install(app, service, keys)` answers the SDK's `/api/v1/...` requests on the same
`Service`, engine, keys and ownership rules as the native API.

Modules: `routes` (the router), `session_routes` / `training_routes` / `weights_routes` /
`sampling_routes` / `rest_routes` / `account_routes` (the endpoints), `context` (what they share), `bodies` (JSON
bodies), `proto` and `codec` (protobuf messages and tensor encodings), `answers` (how results
are stored and served), `ids` (model ids, sequence ids, checkpoint paths), `sessions` (client
sessions and expiry), `tokenizers` and `archive` (checkpoint downloads).
"""

from bios.server.tinker.routes import install

__all__ = ["install"]
