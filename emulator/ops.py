"""The layer primitives of the decoder (docs/losses.md, §Model and M1), each with its
hand-written backward: RMSNorm, RoPE, causal grouped-query attention, SiLU, the LoRA linear
and log-softmax.

Every array is float64. Shapes use T tokens, D model width, H query heads, K kv heads,
E head dim, F ffn width, V vocab, R LoRA rank; `in`/`out` are a linear layer's widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bios.catalog import ModelSpec


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """§Model RMSNorm `n(x) = x / sqrt(mean(x²) + eps) · w` over the last axis.

    x: [..., N], weight: [N]. Returns (y [..., N], inv_rms [..., 1]) — the latter for the backward.
    """
    inv_rms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * inv_rms * weight, inv_rms


def rms_norm_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, inv_rms: np.ndarray) -> np.ndarray:
    """§Model RMSNorm, backward: `dx = r·g - r³·x·mean(g·x)` with `g = dy·w`, `r = inv_rms`.

    dy, x: [..., N], weight: [N], inv_rms: [..., 1]. Returns dx [..., N].
    """
    g = dy * weight
    return inv_rms * g - inv_rms**3 * x * np.mean(g * x, axis=-1, keepdims=True)


def rope_inv_freq(spec: ModelSpec) -> np.ndarray:
    """§Model RoPE frequencies `inv_freq[i] = theta^(-2i/E)`, i < E/2, with Llama-3 scaling.

    Llama-3 scaling is transformers' `_compute_llama3_parameters`: wavelengths longer than
    `original_max_position_embeddings / low_freq_factor` are divided by `factor`, shorter than
    `... / high_freq_factor` are kept, and the band between is interpolated smoothly.
    Returns [E/2].
    """
    e = spec.head_dim
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e)
    if spec.rope_scaling is None:
        return inv_freq
    cfg = dict(spec.rope_scaling)
    factor, low, high = cfg["factor"], cfg["low_freq_factor"], cfg["high_freq_factor"]
    old_len = cfg["original_max_position_embeddings"]
    wavelen = 2.0 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled)


def rope_tables(spec: ModelSpec, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """§Model RoPE tables for positions 0..T-1: (cos, sin), each [T, E] (frequencies repeated twice)."""
    angles = np.outer(np.arange(n_tokens, dtype=np.float64), rope_inv_freq(spec))
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    """Hugging Face rotate-half: `[x1, x2] → [-x2, x1]` on the last axis (E)."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """§Model RoPE (rotate-half): `x·cos + rotate_half(x)·sin`. x: [T, N, E], cos/sin: [T, E]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def rope_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """§Model RoPE, backward: rotate_half is antisymmetric, so `dx = dy·cos - rotate_half(dy·sin)`.

    dy: [T, N, E], cos/sin: [T, E]. Returns dx [T, N, E].
    """
    return dy * cos[:, None, :] - _rotate_half(dy * sin[:, None, :])


def _grouped(q: np.ndarray, n_kv: int) -> np.ndarray:
    """[T, H, E] → [K, H/K, T, E]: query head h = k·(H/K) + g reads kv head k = h // (H/K)."""
    t, h, e = q.shape
    return q.reshape(t, n_kv, h // n_kv, e).transpose(1, 2, 0, 3)


def _ungrouped(x: np.ndarray) -> np.ndarray:
    """[K, H/K, T, E] → [T, H, E], the inverse of `_grouped`."""
    k, g, t, e = x.shape
    return x.transpose(2, 0, 1, 3).reshape(t, k * g, e)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """§Model causal grouped-query attention, scores scaled by 1/sqrt(E).

    q: [T, H, E], k, v: [T, K, E]. Returns (out [T, H, E], probs [K, H/K, T, T]).
    """
    n_tokens, _, e = q.shape
    qg = _grouped(q, k.shape[1])
    scores = np.einsum("kgte,ske->kgts", qg, k) / math.sqrt(e)
    causal = np.tril(np.ones((n_tokens, n_tokens), dtype=bool))
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("kgts,ske->kgte", probs, v)
    return _ungrouped(out), probs


def cached_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """§Model attention for queries at positions start..start+n-1 over keys at 0..t-1 (a KV cache).

    q: [n, H, E], k, v: [t, K, E] with t = start + n. Query i sees keys 0..start+i. Returns [n, H, E];
    with start 0 it equals `attention(q, k, v)[0]`.
    """
    n_queries, e = q.shape[0], q.shape[-1]
    scores = np.einsum("kgne,ske->kgns", _grouped(q, k.shape[1]), k) / math.sqrt(e)
    visible = np.arange(k.shape[0])[None, :] <= start + np.arange(n_queries)[:, None]
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return _ungrouped(np.einsum("kgns,ske->kgne", probs, v))


def attention_backward(
    dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§Model attention, backward through `softmax(q kᵀ / sqrt(E)) v`.

    dout, q: [T, H, E], k, v: [T, K, E], probs: [K, H/K, T, T]. Returns (dq [T, H, E],
    dk [T, K, E], dv [T, K, E]); kv gradients sum over the query heads sharing them.
    """
    e = q.shape[-1]
    dout_g = _grouped(dout, k.shape[1])
    dv = np.einsum("kgts,kgte->ske", probs, dout_g)
    dprobs = np.einsum("kgte,ske->kgts", dout_g, v)
    dscores = probs * (dprobs - np.sum(dprobs * probs, axis=-1, keepdims=True)) / math.sqrt(e)
    dq = np.einsum("kgts,ske->kgte", dscores, k)
    dk = np.einsum("kgts,kgte->ske", dscores, _grouped(q, k.shape[1]))
    return _ungrouped(dq), dk, dv


def silu(x: np.ndarray) -> np.ndarray:
    """§Model SiLU `x·sigmoid(x)`. x: [T, F]."""
    return x / (1.0 + np.exp(-x))


def silu_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """§Model SiLU, backward: `d silu/dx = s·(1 + x·(1 - s))` with `s = sigmoid(x)`. dy, x: [T, F]."""
    s = 1.0 / (1.0 + np.exp(-x))
    return dy * s * (1.0 + x * (1.0 - s))


def log_softmax(z: np.ndarray) -> np.ndarray:
    """L6 `z - logsumexp(z)` over the last axis. z: [..., V]."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


@dataclass(frozen=True, slots=True)
class LoraFactors:
    """One adapted linear's LoRA term (M1): A [in, R], B [R, out], scale alpha/rank, and the
    dropout multiplier [T, in] of its input (None when dropout is off)."""

    a: np.ndarray
    b: np.ndarray
    scale: float
    dropout: np.ndarray | None


@dataclass(frozen=True, slots=True)
class LinearCache:
    """What `linear_backward` needs of an adapted linear: drop(x) [T, in] and drop(x) A [T, R]."""

    x_dropped: np.ndarray | None
    xa: np.ndarray | None


def linear(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, lora: LoraFactors | None
) -> tuple[np.ndarray, LinearCache]:
    """M1 `y = x Wᵀ (+ b) + (alpha/rank) · (drop(x) A) B`.

    x: [T, in], weight: [out, in] (Hugging Face layout), bias: [out] or None. Returns (y [T, out], cache).
    """
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    if lora is None:
        return y, LinearCache(None, None)
    x_dropped = x if lora.dropout is None else x * lora.dropout
    xa = x_dropped @ lora.a
    return y + lora.scale * (xa @ lora.b), LinearCache(x_dropped, xa)


def linear_backward(
    dy: np.ndarray, weight: np.ndarray, lora: LoraFactors | None, cache: LinearCache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """M1, backward, with `s` = alpha/rank and `mask` the dropout multiplier:
    `dx = dy W + s·mask·((dy Bᵀ) Aᵀ)`, `dA = s·drop(x)ᵀ (dy Bᵀ)`, `dB = s·(drop(x) A)ᵀ dy`.

    dy: [T, out], weight: [out, in]. Returns (dx [T, in], dA [in, R] or None, dB [R, out] or None).
    """
    dx = dy @ weight
    if lora is None:
        return dx, None, None
    assert cache.x_dropped is not None and cache.xa is not None, "a LoRA linear's forward keeps its inputs"
    dy_bt = dy @ lora.b.T
    d_lora_in = lora.scale * (dy_bt @ lora.a.T)
    dx = dx + (d_lora_in if lora.dropout is None else d_lora_in * lora.dropout)
    return dx, lora.scale * (cache.x_dropped.T @ dy_bt), lora.scale * (cache.xa.T @ dy)
