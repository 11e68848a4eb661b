"""The tensor files of a checkpoint: safetensors (the default, readable anywhere) or Orbax
(the jax backend's format, read and written with `orbax-checkpoint`).

Tensors are a flat dict of `group/name` → array; reading detects the format from the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from bios.errors import UnsupportedError

FORMATS = ("safetensors", "orbax")
SAFETENSORS_FILE = "adapter.safetensors"
ORBAX_DIR = "orbax"


def write_tensors(directory: Path, tensors: dict[str, np.ndarray], tensor_format: str) -> None:
    """Write `tensors` into `directory` (which must exist) in `tensor_format`."""
    if tensor_format == "orbax":
        checkpointer = _checkpointer()
        try:
            checkpointer.save(
                str(directory.resolve() / ORBAX_DIR), {k: np.ascontiguousarray(v) for k, v in tensors.items()}
            )
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
    elif tensor_format == "safetensors":
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / SAFETENSORS_FILE))
    else:
        raise ValueError(f"unknown tensor format {tensor_format!r}; expected one of {FORMATS}")


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """The tensors stored in `directory`, whichever format they were written in (host arrays)."""
    if (directory / SAFETENSORS_FILE).exists():
        return load_file(str(directory / SAFETENSORS_FILE))
    checkpointer = _checkpointer()
    try:
        restored = checkpointer.restore(str(directory.resolve() / ORBAX_DIR))
    finally:
        checkpointer.close()
    return {k: np.asarray(v) for k, v in restored.items()}


def _checkpointer() -> Any:
    """An Orbax checkpointer that this process drives alone: in a group of several JAX processes
    only the one running the engine reads and writes checkpoints (the others never join its
    barriers), so the checkpointer's processes are this one only."""
    ocp = _orbax()
    import jax

    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=alone)


def _orbax() -> Any:
    """The orbax.checkpoint module (typed Any: it ships no stubs)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise UnsupportedError(
            "this checkpoint is stored with Orbax (the jax backend's format); install 'bios[jax]' to read or write it",
            field="path",
        ) from None
    return ocp
