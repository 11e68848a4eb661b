"""Transports carry the clients' calls to an engine: in this process, or (later) over HTTP.

A transport exposes the `Engine` methods the clients use; `connect` picks one from the
resolved client configuration.
"""

from __future__ import annotations

from bios.config import ClientConfig
from bios.engine import Engine
from bios.errors import UnsupportedError
from bios.transport.inprocess import shared_engine

Transport = Engine
"""The interface every transport offers: the engine's public methods."""


def connect(config: ClientConfig) -> Transport:
    """The transport for `config`: the shared in-process engine when there is no base URL."""
    if config.base_url is not None:
        raise UnsupportedError(
            f"base_url: remote servers are not supported by this version of bios (got {config.base_url!r}); "
            "unset BIOS_BASE_URL / base_url to run in-process",
            field="base_url",
        )
    return shared_engine(config.backend, config.home, config.backend_options)


__all__ = ["Transport", "connect"]
