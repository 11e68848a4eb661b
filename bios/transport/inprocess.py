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

_engines: dict[tuple[str, Path, tuple[tuple[str, str], ...]], Engine] = {}
_lock = threading.Lock()


def shared_engine(backend: str, home: Path, options: tuple[tuple[str, str], ...] = ()) -> Engine:
    """The process's engine for `backend` (with `options`) storing checkpoints under `home/checkpoints`."""
    key = (backend, Path(home).resolve(), tuple(options))
    with _lock:
        if key not in _engines:
            catalog = Catalog()
            compute = create_backend(backend, BackendConfig(catalog=catalog, options=dict(options)))
            store = CheckpointStore(key[1] / "checkpoints", getattr(compute, "checkpoint_format", "safetensors"))
            _engines[key] = Engine(compute, catalog, store)
        return _engines[key]


def close_all() -> None:
    """Shut down every shared engine (registered to run at interpreter exit)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()


atexit.register(close_all)
