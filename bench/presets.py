"""Benchmark models: random-weight presets of real sizes, and opening a model on the JAX backend."""

from __future__ import annotations

import bios
from bios.catalog import ModelSpec

PRESETS = {  # random-weight configurations for benchmarks (Llama 3.2 1B-like and Llama 3.1 8B-like)
    "llama-1b": ModelSpec(
        name="bench/llama-1b",
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
        weights_seed=0,
        max_lora_rank=64,
    ),
    "llama-8b": ModelSpec(
        name="bench/llama-8b",
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        weights_seed=0,
        max_lora_rank=64,
    ),
}


def open_model(model: str, dtype: str | None) -> tuple[bios.ServiceClient, ModelSpec]:
    """A JAX ServiceClient serving `model` (a catalog name, or a preset drawn on device) and its spec."""
    options = {"weights_init": "device"} if model in PRESETS else {}
    if dtype:
        options["dtype"] = dtype
    service = bios.ServiceClient(backend="jax", backend_options=options)
    catalog = service._transport.catalog
    spec = PRESETS[model] if model in PRESETS else catalog.get(model)
    catalog.register(spec)
    return service, spec
