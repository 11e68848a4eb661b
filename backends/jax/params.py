"""Parameter layout of the JAX backend, and the conversion from Hugging Face tensors.

Base weights (frozen, stored once, float32 on CPU / bfloat16 on GPU), a flat dict of arrays:
    embed            [V, D]
    final_norm       [D]
    lm_head          [D, V]           (absent when embeddings are tied: embed.T is used)
    layers.<name>    [L, ...]         stacked so the decoder runs under `jax.lax.scan`:
        in_norm [L, D], post_norm [L, D],
        q_proj [L, D, H*E], k_proj [L, D, K*E], v_proj [L, D, K*E], o_proj [L, H*E, D],
        gate_proj [L, D, F], up_proj [L, D, F], down_proj [L, F, D]     (math layout: x @ W)
        q_bias [L, H*E], k_bias [L, K*E], v_bias [L, K*E]               (qwen2 only)
        q_norm [L, E], k_norm [L, E]                                    (qwen3 only)

LoRA state (trainable, always float32), adapters of many sessions side by side in S slots of
rank up to R (columns beyond a slot's rank, and modules it does not adapt, are exactly zero):
    lora.<module>.a  [L, S, in, R]    lora.<module>.b  [L, S, R, out]    for the 7 projections
    lora.lm_head.a   [S, D, R]        lora.lm_head.b   [S, R, V]
    scale            [S]              alpha / rank of each slot (0 for a free slot)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bios.catalog import ModelSpec
from bios.weights import base_weight_shapes, module_path

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_layout(spec: ModelSpec) -> dict[str, tuple[str, bool]]:
    """Every base array of the stacked layout → (its Hugging Face name, with `{i}` for the
    layer index when stacked, and whether each tensor is transposed to math layout)."""
    layout = {
        "embed": ("model.embed_tokens.weight", False),
        "final_norm": ("model.norm.weight", False),
        "layers.in_norm": ("model.layers.{i}.input_layernorm.weight", False),
        "layers.post_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    }
    for module in PROJECTIONS:
        layout[f"layers.{module}"] = (module_path(0, module).replace("layers.0.", "layers.{i}.") + ".weight", True)
    if spec.qkv_bias:
        for short in ("q", "k", "v"):
            layout[f"layers.{short}_bias"] = (f"model.layers.{{i}}.self_attn.{short}_proj.bias", False)
    if spec.qk_norm:
        layout["layers.q_norm"] = ("model.layers.{i}.self_attn.q_norm.weight", False)
        layout["layers.k_norm"] = ("model.layers.{i}.self_attn.k_norm.weight", False)
    if not spec.tie_embeddings:
        layout["lm_head"] = ("lm_head.weight", True)
    return layout


def assemble(spec: ModelSpec, key: str, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """Base array `key` (host) from the HF tensors that `read(name)` returns."""
    name, transpose = base_layout(spec)[key]
    if "{i}" not in name:
        tensor = read(name)
        return tensor.T if transpose else tensor
    return np.stack([read(name.format(i=i)).T if transpose else read(name.format(i=i)) for i in range(spec.n_layers)])


def stacked_shape(spec: ModelSpec, key: str) -> tuple[int, ...]:
    """Shape of base array `key` in the stacked layout."""
    name, transpose = base_layout(spec)[key]
    shape = base_weight_shapes(spec)[name.format(i=0)]
    shape = shape[::-1] if transpose else shape
    return (spec.n_layers, *shape) if "{i}" in name else shape


def base_from_hf(spec: ModelSpec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face tensors (`[out, in]`, by HF name) → the stacked layout above (host arrays)."""
    return {key: assemble(spec, key, weights.__getitem__) for key in base_layout(spec)}


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
