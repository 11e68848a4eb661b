"""Transports carry the clients' calls to the service: in this process, or over HTTP to `bios serve`.

`Transport` (bios.transport.protocol) is what the clients use; `connect` picks one from the
resolved client configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bios.config import ClientConfig
from bios.transport.protocol import Transport

if TYPE_CHECKING:
    from bios.transport.inprocess import EnginePool


def connect(config: ClientConfig, engines: EnginePool | None = None) -> Transport:
    """The transport for `config`: a new HTTP transport to `config.base_url` (the caller owns it
    and closes it), else the engine of `engines` (default: the process's pool, which owns it)
    for the configured backend."""
    if config.base_url is not None:
        from bios.transport.http import HttpTransport  # needs the `server` extra (httpx)

        return HttpTransport(config.base_url, config.api_key)
    from bios.transport.inprocess import default_pool

    pool = engines if engines is not None else default_pool()
    return pool.engine(config.backend, config.home, config.backend_options, config.simulation)


__all__ = ["Transport", "connect"]
