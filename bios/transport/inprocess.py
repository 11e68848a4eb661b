"""The in-process transport: one shared engine per (backend, BIOS_HOME, options) in this process.

Sharing means that every ServiceClient of a process with the same backend batches into the
same backend calls and sees the same sampler snapshots.
"""

from __future__ import annotations

import atexit
import threading
from pathlib import Path

from bios.backend import BackendConfig
from bios.catalog import Catalog
from bios.engine import CheckpointStore, Engine, create_backend
from bios.engine.registry import simulated
from bios.simulation import SimulationConfig, SimulationReport

_engines: dict[tuple[str, Path, tuple[tuple[str, str], ...], str], Engine] = {}
_lock = threading.Lock()


def shared_engine(
    backend: str, home: Path, options: tuple[tuple[str, str], ...] = (), simulation: SimulationConfig | None = None
) -> Engine:
    """The process's engine for `backend` (with `options`, under `simulation` if given) storing
    checkpoints under `home/checkpoints`; it serves the built-in models and those installed under
    `home/models` (`bios models fetch`)."""
    key = (backend, Path(home).resolve(), tuple(options), simulation.model_dump_json() if simulation else "")
    with _lock:
        if key not in _engines:
            catalog = Catalog()
            catalog.register_installed(key[1] / "models")
            compute = create_backend(backend, BackendConfig(catalog=catalog, options=dict(options)))
            if simulation is not None:
                compute = simulated(compute, simulation, catalog)
            store = CheckpointStore(key[1] / "checkpoints", getattr(compute, "checkpoint_format", "safetensors"))
            _engines[key] = Engine(compute, catalog, store)
        return _engines[key]


def simulation_reports() -> list[SimulationReport]:
    """The report of every shared engine that simulates, in the order the engines were created
    (each call also writes that engine's trace file when its simulation names one)."""
    with _lock:
        engines = [engine for engine in _engines.values() if engine.simulating]
    return [engine.simulation_report() for engine in engines]  # type: ignore[misc]


def close_all() -> None:
    """Shut down every shared engine (registered to run at interpreter exit)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()


atexit.register(close_all)
