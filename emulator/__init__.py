"""The NumPy reference backend of Bios: float64, one datum at a time, every formula of
docs/losses.md in its own small function. `create_backend` is the factory the engine calls."""

from __future__ import annotations

from bios.backend import BackendConfig
from emulator.backend import EmulatorBackend

__all__ = ["EmulatorBackend", "create_backend"]


def create_backend(config: BackendConfig) -> EmulatorBackend:
    """An `EmulatorBackend` over `config.catalog` (options are ignored)."""
    return EmulatorBackend(config)
