"""Pure arithmetic of the decoder (docs/losses.md §Model): norms, RoPE, attention, multi-LoRA.

Shapes: B rows, T tokens, N = B*T flattened tokens, D width, H/K query/kv heads, E head dim,
A active adapters, R rank.

Precision, whatever the base weights' dtype (float32, or bfloat16 to halve their memory):
- The base weights are stored in that dtype, and so are the inputs of every matmul against them
  (the norms' outputs, q, k, v, the attention output, silu(gate)·up) and the KV cache.
- Those matmuls accumulate in float32 (`preferred_element_type`), and a projection adds its bias
  and LoRA update in float32 before its one rounding to the weights' dtype.
- The residual stream, norms, RoPE, silu, the attention softmax (`jax.nn.dot_product_attention`
  computes its scores and softmax in float32) and the logits with their log-softmax are float32:
  logits are never rounded before the log-softmax (model.py).
- LoRA factors, their products with the activations, gradients, gradient accumulators and the
  optimizer state are float32 (params.py, slots.py, optimizer.py).
conformance/tolerances.py derives from this how far a bfloat16 run may stray from float64.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from bios.catalog import ModelSpec

LOG = logging.getLogger(__name__)


def rope_inv_freq(spec: ModelSpec) -> np.ndarray:
    """[E/2] inverse frequencies `theta^(-2i/E)`, with Llama-3 scaling when configured (host, float64)."""
    e = spec.head_dim
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e)
    if spec.rope_scaling is None:
        return inv_freq
    cfg = dict(spec.rope_scaling)
    factor, low, high = cfg["factor"], cfg["low_freq_factor"], cfg["high_freq_factor"]
    original = cfg["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= original / low) & (wavelen >= original / high)
    return np.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def rope_tables(inv_freq: np.ndarray, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, E] for integer positions [B, T] (frequencies repeated twice, rotate-half)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, E] rotated: `x·cos + rotate_half(x)·sin`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos[:, :, None] + rotated.astype(jnp.float32) * sin[:, :, None]).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`x / sqrt(mean(x²) + eps) · w` over the last axis, computed in float32 and returned in
    w.dtype, the dtype of the matmuls it feeds."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(weight.dtype)


@dataclass(frozen=True)
class Routing:
    """Which adapter each row uses. The adapters are the A entries of the LoRA arrays a program
    sees (the active slots, compacted by compiled.py): `adapter` [B] int32 is each row's index
    among them, `scale` [B] its alpha/rank (0 for the bare model), and `onehot` [B, A] float32
    the same choice as a one-hot matrix (None when A = 1: every row uses adapter 0).
    With LoRA dropout (M1, forward_backward only), `dropout_keys` [B] and `dropout_rate` [B]
    give each row's random key (already folded with the layer) and its adapter's rate."""

    adapter: jax.Array
    scale: jax.Array
    onehot: jax.Array | None = None
    dropout_keys: jax.Array | None = None
    dropout_rate: jax.Array | None = None

    def at_layer(self, layer: jax.Array) -> Routing:
        """The routing of one layer: dropout keys folded with the layer index."""
        if self.dropout_keys is None:
            return self
        keys = jax.vmap(lambda key: jax.random.fold_in(key, layer))(self.dropout_keys)
        return Routing(self.adapter, self.scale, self.onehot, keys, self.dropout_rate)


jax.tree_util.register_dataclass(
    Routing, data_fields=["adapter", "scale", "onehot", "dropout_keys", "dropout_rate"], meta_fields=[]
)


def lora_input(x: jax.Array, routing: Routing, site: int) -> jax.Array:
    """M1 `drop(x)` for x [B, T, in]: inverted dropout with each row's rate, the mask drawn from
    the row's key folded with `site` (the module); x itself when dropout is off. The masks are
    deterministic in (adapter seed, step, datum, layer, module) but are not the emulator's."""
    rates = routing.dropout_rate
    if routing.dropout_keys is None or rates is None:
        return x
    keys = jax.vmap(lambda key: jax.random.fold_in(key, site))(routing.dropout_keys)
    keep = jax.vmap(lambda key, rate: jax.random.bernoulli(key, 1.0 - rate, x.shape[1:]))(keys, rates)
    return jnp.where(keep, x / (1.0 - rates)[:, None, None].astype(x.dtype), jnp.zeros_like(x))


def per_row(x: jax.Array, w: jax.Array, routing: Routing) -> jax.Array:
    """x [B, T, i] times each row's own factor of w [A, i, o] → [B, T, o] (x's dtype promoted).

    One adapter (A = 1): a plain product. Rows longer than A: each row's factor gathered
    ([B, i, o]) and a batched product, so the work is that of the rows' tokens. Shorter rows
    (decode): the product with every active adapter, the row's own kept by `routing.onehot`,
    cheaper than gathering a factor per row when T is small.
    """
    if w.shape[0] == 1:
        return jnp.einsum("bti,io->bto", x, w[0])
    if routing.onehot is None:
        raise ValueError(f"routing of {w.shape[0]} adapters needs its one-hot matrix")
    if x.shape[1] >= w.shape[0]:
        return jnp.einsum("bti,bio->bto", x, w[routing.adapter])
    return jnp.einsum("btao,ba->bto", jnp.einsum("bti,aio->btao", x, w), routing.onehot)


def lora_down(x: jax.Array, a: jax.Array, routing: Routing) -> jax.Array:
    """M1's first half, scaled: `scale · x A` for x [B, T, in] and a [A, in, R] → [B, T, R] float32."""
    return per_row(x.astype(jnp.float32), a, routing) * routing.scale[:, None, None]


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, routing: Routing) -> jax.Array:
    """M1 for a batch mixing adapters: `scale · (x A) B` with each row's adapter.

    x: [B, T, in]; a: [A, in, R]; b: [A, R, out] (A the adapters of `routing`).
    Returns [B, T, out] float32; its cost follows the rows' tokens, A and R (`per_row`).
    """
    if a.shape[0] == 1:
        return _one_adapter_delta(x.astype(jnp.float32), a[0], b[0], routing.scale)
    return per_row(lora_down(x, a, routing), b, routing)


@jax.custom_vjp
def _one_adapter_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """`scale · (x a) b` for x [B, T, in] float32, a [in, R], b [R, out], scale [B] → [B, T, out].

    Its gradient is written out (`_one_adapter_backward`) so that each product reads the large
    activations in the layout they were made in: left to itself, XLA on CPU gives the products
    for the factors' gradients a transposed copy of x or of the incoming gradient, recomputing
    into it the elementwise work that produced them (about a tenth of a training step)."""
    return _one_adapter_forward(x, a, b, scale)[0]


def _one_adapter_forward(
    x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    u = jnp.einsum("bti,ir->btr", x, a) * scale[:, None, None]
    return jnp.einsum("btr,ro->bto", u, b), (x, a, b, scale, u)


def _one_adapter_backward(
    saved: tuple[jax.Array, ...], g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    x, a, b, scale, u = saved
    g_u = jnp.einsum("bto,ro->btr", g, b) * scale[:, None, None]
    over_tokens = (((0, 1), (0, 1)), ((), ()))
    g_a = jax.lax.dot_general(g_u, x, over_tokens).T  # [R, in] read from x as it lies, then turned
    g_b = jax.lax.dot_general(u, g, over_tokens)
    return jnp.einsum("btr,ir->bti", g_u, a), g_a, g_b, jnp.zeros_like(scale)


_one_adapter_delta.defvjp(_one_adapter_forward, _one_adapter_backward)


def project(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    lora: tuple[jax.Array, jax.Array] | None,
    routing: Routing,
    site: int = 0,
) -> jax.Array:
    """M1 linear: x [B, T, in] @ w [in, out] (+ bias) + LoRA of drop(x) → [B, T, out] in x.dtype.
    `site` numbers the module for its dropout masks."""
    y = jnp.einsum("bti,io->bto", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if lora is not None:
        y = y + lora_delta(lora_input(x, routing, site), *lora, routing)
    return y.astype(x.dtype)


def preferred_attention() -> str | None:
    """The fused attention kernel to ask for on this platform: "cudnn" (flash attention) on a
    GPU, None (XLA's own) elsewhere."""
    return "cudnn" if jax.default_backend() == "gpu" else None


@functools.cache
def _report_fallback(reason: str) -> None:
    """Log, once per distinct reason, that attention fell back from cuDNN to XLA."""
    LOG.warning("cuDNN attention unavailable, using XLA's attention instead: %s", reason)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, implementation: str | None = None
) -> jax.Array:
    """Grouped-query attention, scores scaled by 1/sqrt(E), via `jax.nn.dot_product_attention`.
    q: [B, T, H, E]; k, v: [B, S, K, E]; mask [B, 1, T, S] or None for plain causal
    self-attention. Returns [B, T, H, E].

    `implementation` (default `preferred_attention()`): "cudnn" asks for the cuDNN flash kernel;
    when cuDNN refuses these inputs (no GPU, float32, an unsupported head size or mask) the
    reason is logged once and XLA's attention runs instead, with the same result."""
    shape = {"is_causal": True} if mask is None else {"mask": mask}
    if (implementation or preferred_attention()) == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **shape)
        except (RuntimeError, ValueError, NotImplementedError) as reason:
            _report_fallback(str(reason))
    return jax.nn.dot_product_attention(q, k, v, **shape)
