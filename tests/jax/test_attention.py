"""Attention asks for cuDNN's flash kernel where it may exist and falls back to XLA's, saying why."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from backends.jax import ops


@pytest.fixture
def qkv() -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)  # [B, T, H, E]
    k, v = (rng.standard_normal((2, 5, 2, 8)).astype(np.float32) for _ in range(2))  # [B, T, K, E]
    return jax.numpy.asarray(q), jax.numpy.asarray(k), jax.numpy.asarray(v)


def test_cpu_prefers_xla_attention() -> None:
    assert jax.default_backend() == "cpu"
    assert ops.preferred_attention() is None


@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_falls_back_to_xla_with_the_reason_logged(qkv, masked: bool, caplog) -> None:
    q, k, v = qkv
    causal = np.tril(np.ones((5, 5), bool))
    mask = jax.numpy.asarray(np.broadcast_to(causal, (2, 1, 5, 5))) if masked else None
    ops._report_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger=ops.LOG.name):
        fused = jax.jit(lambda q, k, v: ops.attention(q, k, v, mask, implementation="cudnn"))(q, k, v)
    plain = jax.jit(lambda q, k, v: ops.attention(q, k, v, mask))(q, k, v)
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(plain))
    [record] = [r for r in caplog.records if r.name == ops.LOG.name]
    assert "cuDNN attention unavailable" in record.getMessage()
    assert "cuDNN is not detected" in record.getMessage()  # the reason JAX gave

    # the same reason again is not logged twice
    caplog.clear()
    jax.jit(lambda q, k, v: ops.attention(q, k, v, mask, implementation="cudnn") * 2)(q, k, v)
    assert not [r for r in caplog.records if r.name == ops.LOG.name]


def test_causal_attention_matches_its_definition(qkv) -> None:
    q, k, v = (np.asarray(a, np.float64) for a in qkv)
    out = np.asarray(ops.attention(*qkv, None))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bthe,bshe->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bhts,bshe->bthe", weights, v), rtol=1e-5, atol=1e-6)
