"""The in-process transport: one shared engine per (backend, BIOS_HOME, options) in this process.

Sharing means that every ServiceClient of a process with the same backend batches into the
same backend calls and sees the same sampler snapshots.
"""

from __future__ import annotations

import atexit
import threading
from pathlib import Path

from bios.admission import DIRECT
from bios.backend import BackendConfig
from bios.catalog import Catalog
from bios.engine import CheckpointStore, Engine, create_backend
from bios.simulation import SimulationConfig, SimulationReport, Simulator, simulate

_engines: dict[tuple[str, Path, tuple[tuple[str, str], ...], str], Engine] = {}
_simulators: dict[int, Simulator] = {}
"""id(engine) → the simulator it runs under."""
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
            simulator = simulate(compute, simulation, catalog) if simulation is not None else None
            if simulator is not None:
                compute = simulator.backend
            store = CheckpointStore(key[1] / "checkpoints", getattr(compute, "checkpoint_format", "safetensors"))
            engine = Engine(compute, catalog, store, hook=simulator.hook if simulator is not None else DIRECT)
            if simulator is not None:
                _simulators[id(engine)] = simulator
            _engines[key] = engine
        return _engines[key]


def simulator_of(engine: object) -> Simulator | None:
    """The simulator a shared engine runs under, if any."""
    with _lock:
        return _simulators.get(id(engine))


def simulation_reports() -> list[SimulationReport]:
    """The report of every shared engine that simulates, in the order the engines were created
    (each call also writes that engine's trace file when its simulation names one)."""
    with _lock:
        simulators = [_simulators[id(engine)] for engine in _engines.values() if id(engine) in _simulators]
    return [simulator.report() for simulator in simulators]


def close_all() -> None:
    """Shut down every shared engine (registered to run at interpreter exit)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
        _simulators.clear()
    for engine in engines:
        engine.close()


atexit.register(close_all)
