"""Transports carry the clients' calls to an engine: in this process, or over HTTP to `bios serve`.

A transport exposes the `Engine` methods the clients use; `connect` picks one from the
resolved client configuration.
"""

from __future__ import annotations

from bios.config import ClientConfig
from bios.engine import Engine
from bios.transport.inprocess import shared_engine

Transport = Engine
"""The interface every transport offers: the engine's public methods."""


def connect(config: ClientConfig) -> Transport:
    """The transport for `config`: HTTP to `config.base_url`, else the shared in-process engine."""
    if config.base_url is not None:
        from bios.transport.http import HttpTransport  # needs the `server` extra (httpx)

        return HttpTransport(config.base_url, config.api_key)  # type: ignore[return-value]
    return shared_engine(config.backend, config.home, config.backend_options, config.simulation)


__all__ = ["Transport", "connect"]
