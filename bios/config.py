"""Client configuration, resolved once: explicit argument, then `BIOS_*` variable, then default.

Variables: `BIOS_API_KEY`, `BIOS_BASE_URL`, `BIOS_BACKEND`, `BIOS_BACKEND_OPTIONS`
(`key=value,key=value`), `BIOS_HOME`, `BIOS_SIMULATION` (a simulation profile's TOML path),
`BIOS_SIMULATION_TRACE` (where the simulator writes its trace file, overriding the profile's
`trace`; only with `BIOS_SIMULATION`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from bios.errors import InvalidRequestError
from bios.simulation import SimulationConfig


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """api_key: sent to a remote server; base_url: None runs in-process; backend: entry-point
    name or `module:factory` (default: jax when installed, else emulator); home: where
    checkpoints live (`BIOS_HOME`, default `~/.bios`)."""

    api_key: str | None
    base_url: str | None
    backend: str
    home: Path
    backend_options: tuple[tuple[str, str], ...] = ()
    """Backend settings as sorted (key, value) pairs, e.g. (("devices", "8"),)."""
    simulation: SimulationConfig | None = None
    """Run the in-process backend under the service simulator (bios.simulation)."""

    @classmethod
    def resolve(
        cls,
        api_key: str | None = None,
        base_url: str | None = None,
        backend: str | None = None,
        backend_options: dict[str, str] | None = None,
        simulation: SimulationConfig | None = None,
    ) -> ClientConfig:
        env = os.environ
        options = backend_options if backend_options is not None else parse_options(env.get("BIOS_BACKEND_OPTIONS", ""))
        if simulation is not None and not isinstance(simulation, SimulationConfig):
            raise InvalidRequestError(
                f"simulation must be a bios.SimulationConfig, got {type(simulation).__name__}", field="simulation"
            )
        simulation = simulation if simulation is not None else SimulationConfig.from_env()
        remote = base_url or env.get("BIOS_BASE_URL") or None
        if simulation is not None and remote is not None:
            raise InvalidRequestError(
                "simulation: a ServiceClient with a base_url talks to a server, which simulates only if started with "
                "`bios serve --simulation PROFILE.toml`; drop base_url (or BIOS_BASE_URL) to simulate in this process",
                field="simulation",
            )
        return cls(
            api_key=api_key or env.get("BIOS_API_KEY") or None,
            base_url=base_url or env.get("BIOS_BASE_URL") or None,
            backend=backend or env.get("BIOS_BACKEND") or default_backend(),
            home=bios_home(),
            backend_options=tuple(sorted((str(k), str(v)) for k, v in options.items())),
            simulation=simulation,
        )


def parse_options(text: str) -> dict[str, str]:
    """`key=value,key=value` → dict; InvalidRequestError naming BIOS_BACKEND_OPTIONS if malformed."""
    options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise InvalidRequestError(
                f"BIOS_BACKEND_OPTIONS: {part!r} is not key=value (example: devices=8,model_parallel=2)",
                field="backend_options",
            )
        options[key.strip()] = value.strip()
    return options


def default_backend() -> str:
    """`jax` when JAX is installed, otherwise the NumPy `emulator`."""
    return "jax" if importlib.util.find_spec("jax") is not None else "emulator"


def bios_home() -> Path:
    """`BIOS_HOME`, or `~/.bios`."""
    return Path(os.environ.get("BIOS_HOME") or Path.home() / ".bios").expanduser()
