"""The FLOP and byte accounting (bios/accounting.py) against counts made independently from
the model's generated weights and LoRA shapes."""

from __future__ import annotations

import numpy as np
import pytest

from bios.accounting import adapter_params, decode_bytes, device_peaks, lora_step_flops, matmul_params
from bios.catalog import Catalog
from bios.weights import generate_base_weights, lora_shapes

TINY = Catalog().get("bios/tiny")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _projection_params(weights: dict[str, np.ndarray]) -> int:
    """Every 2-D weight except the embedding lookup, plus the unembedding (tied or not)."""
    matrices = sum(
        w.size for name, w in weights.items() if w.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name
    )
    return matrices + TINY.vocab_size * TINY.d_model


def test_matmul_and_adapter_parameters_match_the_weights_themselves():
    assert matmul_params(TINY) == _projection_params(generate_base_weights(TINY))
    for rank, modules in ((1, ("q_proj",)), (8, ALL)):
        assert adapter_params(TINY, rank, modules) == sum(
            int(np.prod(shape)) for shape in lora_shapes(TINY, modules, rank).values()
        )


def test_lora_step_flops_is_the_sum_of_its_documented_terms():
    batch, length, rank = 3, 40, 8
    tokens = batch * length
    base, adapters = 4 * matmul_params(TINY) * tokens, 6 * adapter_params(TINY, rank, ALL) * tokens
    attention = 3 * 4 * TINY.n_layers * batch * length * (length / 2) * TINY.n_heads * TINY.head_dim
    assert lora_step_flops(TINY, batch, length, rank, ALL) == pytest.approx(base + adapters + attention, rel=1e-12)
    assert lora_step_flops(TINY, 2 * batch, length, rank, ALL) == pytest.approx(
        2 * (base + adapters + attention), rel=1e-12
    )


def test_decode_bytes_reads_weights_once_and_each_rows_cache():
    one, two = decode_bytes(TINY, 1, 100, 2), decode_bytes(TINY, 2, 100, 2)
    kv_per_row = 2 * TINY.n_layers * 100 * TINY.n_kv_heads * TINY.head_dim * 2
    assert two - one == kv_per_row and one == matmul_params(TINY) * 2 + kv_per_row
    assert device_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12) and device_peaks("cpu") is None
