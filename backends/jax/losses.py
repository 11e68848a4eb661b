"""The built-in losses of docs/losses.md (L1–L5, L9) on per-token logprobs, in jax.numpy.

Every function maps lp [B, T], the loss's inputs [B, T] and the rows' segments [B, T] (which
datum of its row each token belongs to, -1 on padding; None when each row is one datum) to
the elementwise loss [B, T]; the caller masks padding and sums (L0). Only GSPO, whose ratio is
per datum, reads the segments. Gradients come from autodiff; stop-gradients are explicit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Inputs = dict[str, jax.Array]
Config = dict[str, jax.Array]


def _ratio(lp: jax.Array, inputs: Inputs) -> jax.Array:
    return jnp.exp(lp - inputs["logprobs"])


def cross_entropy(lp: jax.Array, inputs: Inputs, config: Config, segments: jax.Array | None) -> jax.Array:
    """L1: `-w · lp`."""
    return -inputs["weights"] * lp


def importance_sampling(lp: jax.Array, inputs: Inputs, config: Config, segments: jax.Array | None) -> jax.Array:
    """L2: `-r · A`."""
    return -_ratio(lp, inputs) * inputs["advantages"]


def _clipped_surrogate(ratio: jax.Array, inputs: Inputs, config: Config) -> jax.Array:
    """`-min(r·A, clip(r)·A)`."""
    adv = inputs["advantages"]
    clipped = jnp.clip(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -jnp.minimum(ratio * adv, clipped * adv)


def ppo(lp: jax.Array, inputs: Inputs, config: Config, segments: jax.Array | None) -> jax.Array:
    """L3: `-min(r·A, clip(r)·A)`."""
    return _clipped_surrogate(_ratio(lp, inputs), inputs, config)


def cispo(lp: jax.Array, inputs: Inputs, config: Config, segments: jax.Array | None) -> jax.Array:
    """L4: `-sg(clip(r)) · lp · A`."""
    clipped = jnp.clip(_ratio(lp, inputs), config["clip_low_threshold"], config["clip_high_threshold"])
    return -jax.lax.stop_gradient(clipped) * lp * inputs["advantages"]


def dro(lp: jax.Array, inputs: Inputs, config: Config, segments: jax.Array | None) -> jax.Array:
    """L5: `-(lp·A - ½·beta·(lp - q)²)`."""
    return -(lp * inputs["advantages"] - 0.5 * config["beta"] * (lp - inputs["logprobs"]) ** 2)


def gspo(lp: jax.Array, inputs: Inputs, config: Config, segments: jax.Array | None) -> jax.Array:
    """L9: L3 with the datum's sequence ratio `s = exp(mean over M of (lp - q))`, M the tokens
    `sequence_ratio_mask` marks (s = 1 when none), as each token's value and the gradient of
    its own lp: `s_t = sg(s) · exp(lp - sg(lp))`."""
    marked = (inputs["sequence_ratio_mask"] != 0).astype(lp.dtype)
    drift = (jax.lax.stop_gradient(lp) - inputs["logprobs"]) * marked
    if segments is None:  # one datum per row
        total, count = drift.sum(-1, keepdims=True), marked.sum(-1, keepdims=True)
    else:  # packed rows: sum over the tokens of the same datum
        same = (segments[:, :, None] == segments[:, None, :]).astype(lp.dtype)
        total, count = jnp.einsum("bts,bs->bt", same, drift), jnp.einsum("bts,bs->bt", same, marked)
    log_s = jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
    return _clipped_surrogate(jnp.exp(log_s + lp - jax.lax.stop_gradient(lp)), inputs, config)


LOSS_FUNCTIONS = {f.__name__: f for f in (cross_entropy, importance_sampling, ppo, cispo, dro, gspo)}
