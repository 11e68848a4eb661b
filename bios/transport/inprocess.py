"""The in-process transport: `EnginePool`, which owns the engines that serve clients in this process.

A pool holds one engine per (backend, BIOS_HOME, options, simulation): every ServiceClient given
the same pool with the same settings shares that engine, so their requests batch into the same
backend calls and they see the same sampler snapshots. Unless told otherwise a ServiceClient
uses the process's pool, `default_pool()`, which is shut down at interpreter exit.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass
from pathlib import Path

from bios.admission import DIRECT
from bios.backend import BackendConfig
from bios.catalog import Catalog
from bios.engine import CheckpointStore, Engine, create_backend
from bios.errors import BiosError
from bios.simulation import SimulationConfig, SimulationReport, Simulator, simulate

Key = tuple[str, Path, tuple[tuple[str, str], ...], str]


@dataclass(frozen=True, slots=True)
class _Pooled:
    engine: Engine
    simulator: Simulator | None
    """The service simulator the engine runs under, if any."""


class EnginePool:
    """Engines of this process by their settings, created on first use and shut down by `close`.
    Safe to use from several threads."""

    def __init__(self) -> None:
        self._pooled: dict[Key, _Pooled] = {}
        self._lock = threading.Lock()
        self._closed = False

    def engine(
        self,
        backend: str,
        home: Path,
        options: tuple[tuple[str, str], ...] = (),
        simulation: SimulationConfig | None = None,
    ) -> Engine:
        """The pool's engine for `backend` (with `options`, under `simulation` if given) storing
        checkpoints under `home/checkpoints`; it serves the built-in models and those installed
        under `home/models` (`bios models fetch`). BiosError once the pool is closed."""
        key = (backend, Path(home).resolve(), tuple(options), simulation.model_dump_json() if simulation else "")
        with self._lock:
            if self._closed:
                raise BiosError("this engine pool is closed; use another EnginePool")
            if key not in self._pooled:
                self._pooled[key] = _start(key, simulation)
            return self._pooled[key].engine

    def simulator_of(self, engine: object) -> Simulator | None:
        """The simulator `engine` (one of this pool's) runs under; None if none or not ours."""
        with self._lock:
            return next((p.simulator for p in self._pooled.values() if p.engine is engine), None)

    def simulation_reports(self) -> list[SimulationReport]:
        """The report of every engine that simulates, in the order the engines were created
        (each call also writes that engine's trace file when its simulation names one)."""
        with self._lock:
            simulators = [p.simulator for p in self._pooled.values() if p.simulator is not None]
        return [simulator.report() for simulator in simulators]

    def close(self) -> None:
        """Shut down every engine of the pool (their queued requests fail); idempotent."""
        with self._lock:
            pooled = list(self._pooled.values())
            self._pooled.clear()
            self._closed = True
        for entry in pooled:
            entry.engine.close()


def _start(key: Key, simulation: SimulationConfig | None) -> _Pooled:
    """A new engine for `key` (see `EnginePool.engine`)."""
    backend, home, options, _ = key
    catalog = Catalog()
    catalog.register_installed(home / "models")
    compute = create_backend(backend, BackendConfig(catalog=catalog, options=dict(options)))
    simulator = simulate(compute, simulation, catalog) if simulation is not None else None
    if simulator is not None:
        compute = simulator.backend
    store = CheckpointStore(home / "checkpoints", getattr(compute, "checkpoint_format", "safetensors"))
    engine = Engine(compute, catalog, store, hook=simulator.hook if simulator is not None else DIRECT)
    return _Pooled(engine, simulator)


_default: EnginePool | None = None
_default_lock = threading.Lock()


def default_pool() -> EnginePool:
    """The process's pool, used by every ServiceClient not given another; made on first use and
    closed at interpreter exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = EnginePool()
            atexit.register(_default.close)
        return _default
