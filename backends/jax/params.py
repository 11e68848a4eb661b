"""Parameter layout of the JAX backend — the one table of every array's name, shape and
logical axes — and the conversion from Hugging Face tensors.

Base weights (frozen, stored once, float32 on CPU / bfloat16 on GPU), a flat dict of arrays
named by their Hugging Face module (`model.` and the layer index dropped), each listed with
its logical axes (letters of docs/shapes.md; HE = H*E, KE = K*E; sharding.py maps them
onto the mesh, None: never split):
    embed_tokens     [V, D]
    norm             [D]              (None)
    lm_head          [D, V]           (absent when embeddings are tied: embed_tokens.T is used)
    layers.<name>    [L, ...]         stacked so the decoder runs under `jax.lax.scan`:
        input_layernorm [L, D], post_attention_layernorm [L, D]          (L, None)
        q_proj [L, D, HE], k_proj [L, D, KE], v_proj [L, D, KE], o_proj [L, HE, D],
        gate_proj [L, D, F], up_proj [L, D, F], down_proj [L, F, D]       (math layout: x @ W)
        q_proj.bias [L, HE], k_proj.bias [L, KE], v_proj.bias [L, KE]     (qwen2 only)
        q_norm [L, E], k_norm [L, E]                                      (qwen3 only; L, None)

LoRA state (trainable, always float32, replicated), adapters of many sessions side by side
in S slots of rank up to R (columns beyond a slot's rank, and modules it does not adapt, are
exactly zero):
    lora.<module>.a  [L, S, in, R]    lora.<module>.b  [L, S, R, out]    for the 7 projections
    lora.lm_head.a   [S, D, R]        lora.lm_head.b   [S, R, V]
    scale            [S]              alpha / rank of each slot (0 for a free slot)
The slot axis is therefore 1 for the layer-stacked factors and 0 otherwise (`slot_axis`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from bios.catalog import ModelSpec
from bios.weights import base_weight_shapes, module_path

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_AXES: dict[str, tuple[str, str]] = {
    "q_proj": ("D", "HE"),
    "k_proj": ("D", "KE"),
    "v_proj": ("D", "KE"),
    "o_proj": ("HE", "D"),
    "gate_proj": ("D", "F"),
    "up_proj": ("D", "F"),
    "down_proj": ("F", "D"),
    "lm_head": ("D", "V"),
}
"""Logical (in, out) axes of every linear layer in math layout."""


@dataclass(frozen=True)
class BaseParam:
    """One base array of the stacked layout."""

    hf_name: str
    """Its Hugging Face tensor name, with `{i}` for the layer index when stacked over layers."""
    transpose: bool
    """Whether it is stored transposed from Hugging Face's `[out, in]` (linear weights)."""
    axes: tuple[str | None, ...]
    """Logical axis of each dimension of the stored array; None: never split."""

    @property
    def stacked(self) -> bool:
        """Whether it stacks one tensor per layer (leading axis L)."""
        return "{i}" in self.hf_name


def base_layout(spec: ModelSpec) -> dict[str, BaseParam]:
    """Every base array of `spec` in the stacked layout (the table above), by name."""
    layer = "model.layers.{i}."
    layout = {
        "embed_tokens": BaseParam("model.embed_tokens.weight", False, ("V", "D")),
        "norm": BaseParam("model.norm.weight", False, (None,)),
        "layers.input_layernorm": BaseParam(layer + "input_layernorm.weight", False, ("L", None)),
        "layers.post_attention_layernorm": BaseParam(layer + "post_attention_layernorm.weight", False, ("L", None)),
    }
    for module in PROJECTIONS:
        name = module_path(0, module).replace("layers.0.", "layers.{i}.") + ".weight"
        layout[f"layers.{module}"] = BaseParam(name, True, ("L", *LINEAR_AXES[module]))
    if spec.qkv_bias:
        for module in ("q_proj", "k_proj", "v_proj"):
            layout[f"layers.{module}.bias"] = BaseParam(
                f"{layer}self_attn.{module}.bias", False, ("L", LINEAR_AXES[module][1])
            )
    if spec.qk_norm:
        layout["layers.q_norm"] = BaseParam(layer + "self_attn.q_norm.weight", False, ("L", None))
        layout["layers.k_norm"] = BaseParam(layer + "self_attn.k_norm.weight", False, ("L", None))
    if not spec.tie_embeddings:
        layout["lm_head"] = BaseParam("lm_head.weight", True, LINEAR_AXES["lm_head"])
    return layout


def assemble(spec: ModelSpec, key: str, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """Base array `key` (host) from the HF tensors that `read(name)` returns."""
    param = base_layout(spec)[key]

    def tensor(name: str) -> np.ndarray:
        return read(name).T if param.transpose else read(name)

    if not param.stacked:
        return tensor(param.hf_name)
    return np.stack([tensor(param.hf_name.format(i=i)) for i in range(spec.n_layers)])


def stacked_shape(spec: ModelSpec, key: str) -> tuple[int, ...]:
    """Shape of base array `key` in the stacked layout."""
    param = base_layout(spec)[key]
    shape = base_weight_shapes(spec)[param.hf_name.format(i=0)]
    shape = shape[::-1] if param.transpose else shape
    return (spec.n_layers, *shape) if param.stacked else shape


def base_from_hf(spec: ModelSpec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face tensors (`[out, in]`, by HF name) → the stacked layout above (host arrays)."""
    return {key: assemble(spec, key, weights.__getitem__) for key in base_layout(spec)}


def slot_axis(name: str) -> int:
    """The slot axis of LoRA-state array `name`: 1 for the layer-stacked factors, else 0."""
    return 0 if name == "scale" or name.startswith("lora.lm_head") else 1


def slot_index(name: str, slot: int) -> tuple[slice | int, ...]:
    """The index of one slot's part of LoRA-state array `name` (e.g. `[:, slot]`)."""
    return (slice(None),) * slot_axis(name) + (slot,)


def compact_index(name: str, ndim: int, slots: object, rank: int, axis: int | None = None) -> tuple[object, ...]:
    """The index of the `slots` (an int array [A]) part, first `rank` columns, of LoRA-state array
    `name` of `ndim` dimensions whose slot axis is `axis` (default `slot_axis(name)`; 0 for the
    optimizer's slot-major copies). The rank axis is the last of an A factor, the one before of a B."""
    index: list[object] = [slice(None)] * ndim
    index[slot_axis(name) if axis is None else axis] = slots
    if name != "scale":
        index[ndim - 1 if name.endswith(".a") else ndim - 2] = slice(0, rank)
    return tuple(index)


def take_part(array: jax.Array, name: str, slots: jax.Array, rank: int, axis: int | None = None) -> jax.Array:
    """`array[compact_index(...)]`: the `slots` [A] part, first `rank` columns, of LoRA-state
    array `name` (slot axis `axis` as in `compact_index`). One slot is read as a dynamic slice,
    which XLA reads in place, rather than a gather."""
    if slots.shape[0] != 1:
        return array[compact_index(name, array.ndim, slots, rank, axis)]
    start, sizes = _part_window(array, name, slots, rank, axis)
    return jax.lax.dynamic_slice(array, start, sizes)


def put_part(
    array: jax.Array,
    name: str,
    slots: jax.Array,
    rank: int,
    values: jax.Array,
    axis: int | None = None,
    add: bool = False,
) -> jax.Array:
    """`array` with its `take_part` replaced by (or, with `add`, increased by) `values`; in place
    when donated. One slot is written as a dynamic update slice rather than a scatter."""
    if slots.shape[0] != 1:
        part = array.at[compact_index(name, array.ndim, slots, rank, axis)]
        return part.add(values) if add else part.set(values)
    start, sizes = _part_window(array, name, slots, rank, axis)
    if add:
        values = values + jax.lax.dynamic_slice(array, start, sizes)
    return jax.lax.dynamic_update_slice(array, values.astype(array.dtype), start)


def _part_window(
    array: jax.Array, name: str, slots: jax.Array, rank: int, axis: int | None
) -> tuple[list[jax.Array], list[int]]:
    """(start indices, sizes) of the one-slot part `take_part` reads."""
    slot = slot_axis(name) if axis is None else axis
    start: list[jax.Array] = [jnp.int32(0)] * array.ndim
    start[slot] = slots[0].astype(jnp.int32)
    sizes = list(array.shape)
    sizes[slot] = 1
    if name != "scale":
        sizes[array.ndim - 1 if name.endswith(".a") else array.ndim - 2] = rank
    return start, sizes


def lora_shapes(spec: ModelSpec, slots: int, rank: int) -> dict[str, tuple[int, ...]]:
    """Shape of every LoRA-state array for `slots` adapters of rank at most `rank`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module, (n_in, n_out) in spec.linear_shapes().items():
        lead = (slots,) if module == "lm_head" else (spec.n_layers, slots)
        shapes[f"lora.{module}.a"] = (*lead, n_in, rank)
        shapes[f"lora.{module}.b"] = (*lead, rank, n_out)
    shapes["scale"] = (slots,)
    return shapes


def slot_arrays(spec: ModelSpec, weights: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """One adapter's factors (bios.weights names, `A: [in, r]`, `B: [r, out]`) → per-slot arrays
    padded to `rank` columns: `lora.<module>.a` [L, in, R] (or [D, R] for lm_head) etc.
    Modules the adapter does not have are zeros."""
    out: dict[str, np.ndarray] = {}
    for module, (n_in, n_out) in spec.linear_shapes().items():
        layers: list[int | None] = [None] if module == "lm_head" else list(range(spec.n_layers))
        a_stack, b_stack = [], []
        for layer in layers:
            path = module_path(layer, module)
            a = np.zeros((n_in, rank), np.float32)
            b = np.zeros((rank, n_out), np.float32)
            if f"{path}.lora_A" in weights:
                r = weights[f"{path}.lora_A"].shape[1]
                a[:, :r] = weights[f"{path}.lora_A"]
                b[:r, :] = weights[f"{path}.lora_B"]
            a_stack.append(a)
            b_stack.append(b)
        out[f"lora.{module}.a"] = a_stack[0] if module == "lm_head" else np.stack(a_stack)
        out[f"lora.{module}.b"] = b_stack[0] if module == "lm_head" else np.stack(b_stack)
    return out


def adapter_weights(
    spec: ModelSpec, arrays: dict[str, np.ndarray], target_modules: tuple[str, ...], rank: int
) -> dict[str, np.ndarray]:
    """The inverse of `slot_arrays`: one slot's arrays → bios.weights names at the adapter's `rank`."""
    weights = {}
    for module in target_modules:
        a, b = arrays[f"lora.{module}.a"], arrays[f"lora.{module}.b"]
        layers: list[int | None] = [None] if module == "lm_head" else list(range(spec.n_layers))
        for index, layer in enumerate(layers):
            path = module_path(layer, module)
            weights[f"{path}.lora_A"] = np.asarray(a if layer is None else a[index])[:, :rank]
            weights[f"{path}.lora_B"] = np.asarray(b if layer is None else b[index])[:rank, :]
    return weights
