"""Transports carry the clients' calls to the service: in this process, or over HTTP to `bios serve`.

`Transport` (bios.transport.protocol) is what the clients use; `connect` picks one from the
resolved client configuration.
"""

from __future__ import annotations

from bios.config import ClientConfig
from bios.transport.protocol import Transport


def connect(config: ClientConfig) -> Transport:
    """The transport for `config`: HTTP to `config.base_url`, else the shared in-process engine."""
    if config.base_url is not None:
        from bios.transport.http import HttpTransport  # needs the `server` extra (httpx)

        return HttpTransport(config.base_url, config.api_key)
    from bios.transport.inprocess import shared_engine

    return shared_engine(config.backend, config.home, config.backend_options, config.simulation)


__all__ = ["Transport", "connect"]
