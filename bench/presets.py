"""Benchmark models: random-weight presets of real sizes, and opening a model on the JAX backend."""

from __future__ import annotations

import dataclasses

import bios
from bios.catalog import ModelSpec

JAX = "backends.jax:create_backend"
"""The JAX backend by its factory: found in a checkout that is not pip-installed too (where
the `bios.backends` entry point that names it does not exist)."""

PRESETS = {  # random-weight configurations: Llama 3.2 1B-like and Llama 3.1 8B-like, and two tiny ones for CPU runs
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
    "tiny-a": ModelSpec(
        name="bench/tiny-a",
        vocab_size=4096,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=128,
        max_seq_len=256,
        weights_seed=0,
        max_lora_rank=32,
    ),
    "tiny-b": ModelSpec(
        name="bench/tiny-b",
        vocab_size=4096,
        d_model=128,
        n_layers=3,
        n_heads=8,
        n_kv_heads=4,
        head_dim=16,
        d_ff=256,
        max_seq_len=256,
        weights_seed=0,
        max_lora_rank=32,
    ),
}


def open_model(
    model: str, dtype: str | None = None, rank: int | None = None, **options: str
) -> tuple[bios.ServiceClient, ModelSpec]:
    """A JAX ServiceClient serving `model` (a catalog name, or a preset drawn on device) and its spec.

    `dtype` and `options` are backend options; `rank`, if given, becomes the model's largest
    LoRA rank, so adapters of that rank are served unpadded.
    """
    options = {"weights_init": "device"} | options if model in PRESETS else options
    if dtype:
        options["dtype"] = dtype
    service = bios.ServiceClient(backend=JAX, backend_options=options)
    catalog = service.transport.catalog
    spec = PRESETS[model] if model in PRESETS else catalog.get(model)
    if rank is not None:
        spec = dataclasses.replace(spec, max_lora_rank=rank)
    catalog.register(spec)
    return service, spec
