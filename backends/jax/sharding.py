"""The device mesh and every array's sharding, declared once.

The mesh has a data/FSDP axis `data` and a tensor-parallel axis `model`. Base weights are
sharded FSDP-style along their input width and tensor-parallel along their output width
(attention heads, FFN width, vocabulary); batches are split along rows. A dimension is only
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

# Logical axes of each base weight (see params.py), by name; None means replicated.
BASE_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": (MODEL, DATA),
    "final_norm": (None,),
    "lm_head": (DATA, MODEL),
    "layers.in_norm": (None, None),
    "layers.post_norm": (None, None),
    "layers.q_proj": (None, DATA, MODEL),
    "layers.k_proj": (None, DATA, MODEL),
    "layers.v_proj": (None, DATA, MODEL),
    "layers.o_proj": (None, MODEL, DATA),
    "layers.gate_proj": (None, DATA, MODEL),
    "layers.up_proj": (None, DATA, MODEL),
    "layers.down_proj": (None, MODEL, DATA),
    "layers.q_bias": (None, MODEL),
    "layers.k_bias": (None, MODEL),
    "layers.v_bias": (None, MODEL),
    "layers.q_norm": (None, None),
    "layers.k_norm": (None, None),
}


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


def base_sharding(name: str, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Sharding of base weight `name`."""
    return NamedSharding(mesh, _fit(shape, BASE_AXES[name], mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of small state: LoRA slots, optimizer moments, per-slot scalars."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Rows of a batch array ([B, ...]) split across `data`."""
    return NamedSharding(mesh, _fit(shape, (DATA,) + (None,) * (len(shape) - 1), mesh))


def rows_multiple(mesh: Mesh) -> int:
    """Batch rows must be a multiple of this for an even split."""
    return math.prod([mesh.shape[DATA]])
