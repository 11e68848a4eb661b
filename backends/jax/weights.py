"""Base weights onto the devices, one stacked array at a time, each placed shard by shard.

A Hugging Face directory is indexed by tensor name (safetensors headers only) and read lazily,
so host memory holds one stacked array at a time and each device receives only its shard:
a model larger than one device loads. Built-in models come from their seed (bit-identical to
the emulator); `init="device"` instead draws random weights on the devices (for benchmarks of
large configurations; not comparable with the emulator).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open

from backends.jax.params import assemble, base_layout, stacked_shape
from backends.jax.sharding import logical_sharding
from bios.catalog import ModelSpec
from bios.weights import generate_base_weights


def _reader(spec: ModelSpec) -> Callable[[str], np.ndarray]:
    """name → float32 host tensor, from the seed or, lazily, from the directory's safetensors."""
    if spec.hf_path is None:
        return generate_base_weights(spec).__getitem__
    index: dict[str, Path] = {}
    for file in sorted(Path(spec.hf_path).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as handle:
            index.update(dict.fromkeys(handle.keys(), file))
    if not index:
        raise FileNotFoundError(f"no *.safetensors in {spec.hf_path}")

    def read(name: str) -> np.ndarray:
        with safe_open(str(index[name]), framework="numpy") as handle:
            return np.asarray(handle.get_tensor(name), dtype=np.float32)

    return read


def _random_on_device(spec: ModelSpec, name: str, index: int, mesh: Mesh, dtype: jnp.dtype) -> jax.Array:
    """N(0, 1/fan-in) for matrices, 1 + N(0, 0.1²) for norm scales, N(0, 0.1²) for biases."""
    shape, param = stacked_shape(spec, name), base_layout(spec)[name]
    matrix = len(shape) - param.stacked == 2
    offset, scale = (1.0, 0.1) if name.endswith("norm") else (0.0, 1.0 / np.sqrt(shape[-2]) if matrix else 0.1)
    draw = offset + scale * jax.random.normal(
        jax.random.fold_in(jax.random.key(spec.weights_seed or 0), index), shape, jnp.float32
    )
    return jax.device_put(draw.astype(dtype), logical_sharding(param.axes, shape, mesh))


def load_base(spec: ModelSpec, mesh: Mesh, dtype: jnp.dtype, init: str = "weights") -> dict[str, jax.Array]:
    """Every base array of params.py, sharded over `mesh` in `dtype`.

    init: "weights" (the seed, or the model directory) or "device" (random, drawn on device).
    """
    if init == "device":
        return {name: _random_on_device(spec, name, i, mesh, dtype) for i, name in enumerate(base_layout(spec))}
    read = _reader(spec)
    base: dict[str, jax.Array] = {}
    for name, param in base_layout(spec).items():
        host = assemble(spec, name, read).astype(dtype)
        sharding = logical_sharding(param.axes, host.shape, mesh)
        base[name] = jax.make_array_from_callback(host.shape, sharding, host.__getitem__)
        del host
    return base
