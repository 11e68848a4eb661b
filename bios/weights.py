"""Host-side weights: the seeded generator of built-in models and LoRA adapters, and the
reader of Hugging Face safetensors.

Every random draw that must agree across backends happens here, in NumPy `default_rng`
streams keyed by (seed, crc32 of the tensor name), so the draw of one tensor never depends
on which other tensors exist or in what order they are made.
Contract layer: imports numpy, safetensors and `bios.catalog` only.

Naming and layout follow Hugging Face: base weights are `[out, in]` (`model.layers.3.mlp.up_proj.weight`);
LoRA factors are stored in math layout, `A: [in, R]`, `B: [R, out]`, under
`model.layers.{i}.{self_attn|mlp}.{module}.lora_A|lora_B` and `lm_head.lora_A|lora_B`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bios.catalog import ModelSpec

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def module_path(layer: int | None, module: str) -> str:
    """Hugging Face path of a linear layer: `model.layers.3.self_attn.q_proj`, or `lm_head`."""
    if module == "lm_head":
        return "lm_head"
    block = "self_attn" if module in _ATTENTION else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


def base_weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every base tensor's Hugging Face name and shape (`[out, in]` for linears)."""
    d, e = spec.d_model, spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, d)}
    for layer in range(spec.n_layers):
        for module, (n_in, n_out) in spec.linear_shapes().items():
            if module != "lm_head":
                shapes[f"{module_path(layer, module)}.weight"] = (n_out, n_in)
        if spec.qkv_bias:
            for module in ("q_proj", "k_proj", "v_proj"):
                shapes[f"{module_path(layer, module)}.bias"] = (spec.linear_shapes()[module][1],)
        if spec.qk_norm:
            shapes[f"model.layers.{layer}.self_attn.q_norm.weight"] = (e,)
            shapes[f"model.layers.{layer}.self_attn.k_norm.weight"] = (e,)
        shapes[f"model.layers.{layer}.input_layernorm.weight"] = (d,)
        shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, d)
    return shapes


def generate_base_weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    """The seeded weights of a built-in model, float32, by Hugging Face name.

    Linear weights ~ N(0, 1/in), embeddings ~ N(0, 1), norm scales ~ 1 + N(0, 0.1^2),
    biases ~ N(0, 0.1^2). Deterministic in (spec.weights_seed, name).
    """
    if spec.weights_seed is None:
        raise ValueError(f"model {spec.name} has no weights_seed; load it from {spec.hf_path}")
    weights = {}
    for name, shape in base_weight_shapes(spec).items():
        rng = _rng(spec.weights_seed, name)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            value = rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = value.astype(np.float32)
    return weights


def read_hf_weights(spec: ModelSpec) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (name, float32 array) from every `*.safetensors` file of `spec.hf_path`."""
    from safetensors import safe_open

    files = sorted(Path(spec.hf_path or "").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {spec.hf_path}")
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                yield name, np.asarray(handle.get_tensor(name), dtype=np.float32)


def load_base_weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    """All base weights of `spec` as float32 by HF name: generated, or read from its directory."""
    if spec.hf_path is None:
        return generate_base_weights(spec)
    expected = base_weight_shapes(spec)
    weights = {name: array for name, array in read_hf_weights(spec) if name in expected}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{spec.hf_path} lacks tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return weights


def lora_shapes(spec: ModelSpec, target_modules: tuple[str, ...], rank: int) -> dict[str, tuple[int, int]]:
    """Name → shape of every LoRA factor of an adapter (`A: [in, R]`, `B: [R, out]`)."""
    shapes = {}
    layers: list[int | None] = list(range(spec.n_layers))
    for module, (n_in, n_out) in spec.linear_shapes().items():
        if module not in target_modules:
            continue
        for layer in [None] if module == "lm_head" else layers:
            path = module_path(layer, module)
            shapes[f"{path}.lora_A"] = (n_in, rank)
            shapes[f"{path}.lora_B"] = (rank, n_out)
    return shapes


def init_lora_weights(spec: ModelSpec, target_modules: tuple[str, ...], rank: int, seed: int) -> dict[str, np.ndarray]:
    """A fresh adapter, float32: A ~ U(-1/sqrt(in), 1/sqrt(in)) keyed by (seed, name); B = 0."""
    weights = {}
    for name, shape in lora_shapes(spec, target_modules, rank).items():
        if name.endswith("lora_A"):
            bound = 1.0 / np.sqrt(shape[0])
            weights[name] = _rng(seed, name).uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            weights[name] = np.zeros(shape, dtype=np.float32)
    return weights


def dropout_scale(seed: int, step: int, datum: int, name: str, shape: tuple[int, ...], rate: float) -> np.ndarray:
    """Inverted-dropout multiplier for the input of adapter `name` (a `...lora_A` path without
    the suffix) on datum `datum` at optimizer step `step`: 0 or 1/(1-rate), float32, `shape`."""
    rng = np.random.default_rng([seed, step, datum, zlib.crc32(name.encode())])
    keep = rng.random(shape) >= rate
    return (keep / (1.0 - rate)).astype(np.float32)
