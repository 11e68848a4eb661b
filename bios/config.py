"""Client configuration, resolved once: explicit argument, then `BIOS_*` variable, then default.

Variables: `BIOS_API_KEY`, `BIOS_BASE_URL`, `BIOS_BACKEND`, `BIOS_HOME`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BACKEND = "emulator"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """api_key: sent to a remote server; base_url: None runs in-process; backend: entry-point
    name or `module:factory`; home: where checkpoints live (`BIOS_HOME`, default `~/.bios`)."""

    api_key: str | None
    base_url: str | None
    backend: str
    home: Path

    @classmethod
    def resolve(cls, api_key: str | None = None, base_url: str | None = None, backend: str | None = None) -> "ClientConfig":
        env = os.environ
        return cls(
            api_key=api_key or env.get("BIOS_API_KEY") or None,
            base_url=base_url or env.get("BIOS_BASE_URL") or None,
            backend=backend or env.get("BIOS_BACKEND") or DEFAULT_BACKEND,
            home=bios_home(),
        )


def bios_home() -> Path:
    """`BIOS_HOME`, or `~/.bios`."""
    return Path(os.environ.get("BIOS_HOME") or Path.home() / ".bios").expanduser()
