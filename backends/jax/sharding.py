"""The device mesh and every array's sharding, declared once.

The mesh has a data/FSDP axis `data` and a tensor-parallel axis `model`. Arrays declare
logical axes (params.py, the one table of parameters); `RULES` maps them onto the mesh: base
weights are sharded FSDP-style along the model width and tensor-parallel along heads, FFN
width and vocabulary; batches are split along rows; LoRA state is replicated. A dimension is only
sharded when the axis size divides it, so the same table serves 1 GPU, 8 GPUs or many hosts
(after `jax.distributed.initialize()`, `jax.devices()` lists every host's devices and the
same code runs on each host).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

RULES: dict[str, str] = {"B": DATA, "D": DATA, "HE": MODEL, "KE": MODEL, "F": MODEL, "V": MODEL}
"""The mesh axis of each logical axis (params.py) that is split; any other axis is replicated.
Rows of a batch (B) and the model width (D, FSDP) go over `data`; heads, FFN width and
vocabulary over `model`."""


def make_mesh(model_parallel: int = 1, devices: list | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all), `model_parallel` devices per model group.

    Raises ValueError if the device count is not a multiple of `model_parallel`.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % model_parallel:
        raise ValueError(f"{len(devices)} devices cannot form groups of {model_parallel}")
    grid = np.array(devices).reshape(len(devices) // model_parallel, model_parallel)
    return Mesh(grid, (DATA, MODEL))


def _fit(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh) -> PartitionSpec:
    """`axes` with every axis that does not divide its dimension dropped."""
    return PartitionSpec(*(a if a is not None and shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(axes)))


def logical_sharding(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Sharding of an array of `shape` whose dimensions have logical `axes` (None: replicated)."""
    return NamedSharding(mesh, _fit(shape, tuple(RULES.get(a) if a else None for a in axes), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of small state: LoRA slots, optimizer moments, per-slot scalars."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Rows of a batch array ([B, ...]) split across `data`."""
    return logical_sharding(("B",) + (None,) * (len(shape) - 1), shape, mesh)


def rows_multiple(mesh: Mesh) -> int:
    """Batch rows must be a multiple of this for an even split."""
    return math.prod([mesh.shape[DATA]])
