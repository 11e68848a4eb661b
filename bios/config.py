"""Client configuration, resolved once: explicit argument, then `BIOS_*` variable, then default.

Variables: `BIOS_API_KEY`, `BIOS_BASE_URL`, `BIOS_BACKEND`, `BIOS_BACKEND_OPTIONS`
(`key=value,key=value`), `BIOS_HOME`, `BIOS_SIMULATION` (a simulation profile's TOML path),
`BIOS_SIMULATION_TRACE` (where the simulator writes its trace file, overriding the profile's
`trace`; only with `BIOS_SIMULATION`), and JAX's own `JAX_COMPILATION_CACHE_DIR`, passed to
the backend as its `compilation_cache_dir` option unless the options name one.

This module is the one place that reads them: backends get frozen `BackendConfig`s. `bios
simulate` runs a script under `script_defaults(...)` instead of writing the environment.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
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
        options = with_compilation_cache(options)
        if simulation is not None and not isinstance(simulation, SimulationConfig):
            raise InvalidRequestError(
                f"simulation must be a bios.SimulationConfig, got {type(simulation).__name__}", field="simulation"
            )
        script = _script_defaults()
        if simulation is None:
            simulation = script.simulation if script is not None else SimulationConfig.from_env()
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
            backend=backend or env.get("BIOS_BACKEND") or (script.backend if script else None) or default_backend(),
            home=bios_home(),
            backend_options=tuple(sorted((str(k), str(v)) for k, v in options.items())),
            simulation=simulation,
        )


@dataclass(frozen=True, slots=True)
class ScriptDefaults:
    """What a script run by `bios simulate` gets: its `simulation` (in place of
    `BIOS_SIMULATION`) and, when neither an argument nor `BIOS_BACKEND` names one, `backend`."""

    simulation: SimulationConfig
    backend: str


_script: list[ScriptDefaults] = []
_script_lock = threading.Lock()


@contextlib.contextmanager
def script_defaults(defaults: ScriptDefaults) -> Iterator[None]:
    """Within this block, every ServiceClient of the process resolves with `defaults`."""
    with _script_lock:
        _script.append(defaults)
    try:
        yield
    finally:
        with _script_lock:
            _script.remove(defaults)


def _script_defaults() -> ScriptDefaults | None:
    with _script_lock:
        return _script[-1] if _script else None


def with_compilation_cache(options: dict[str, str]) -> dict[str, str]:
    """`options`, plus `compilation_cache_dir` from `JAX_COMPILATION_CACHE_DIR` when that is set
    and the options name no cache (backends that keep no compiled programs ignore it)."""
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR", "").strip()
    if not directory or "compilation_cache_dir" in options:
        return dict(options)
    return {**options, "compilation_cache_dir": directory}


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
