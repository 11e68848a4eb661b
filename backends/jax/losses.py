"""The built-in losses of docs/losses.md (L1–L5) on per-token logprobs, in jax.numpy.

Every function maps lp [B, T] and the loss's inputs [B, T] to the elementwise loss [B, T];
the caller masks padding and sums (L0). Gradients come from autodiff; CISPO's stop-gradient
is explicit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Inputs = dict[str, jax.Array]
Config = dict[str, jax.Array]


def _ratio(lp: jax.Array, inputs: Inputs) -> jax.Array:
    return jnp.exp(lp - inputs["logprobs"])


def cross_entropy(lp: jax.Array, inputs: Inputs, config: Config) -> jax.Array:
    """L1: `-w · lp`."""
    return -inputs["weights"] * lp


def importance_sampling(lp: jax.Array, inputs: Inputs, config: Config) -> jax.Array:
    """L2: `-r · A`."""
    return -_ratio(lp, inputs) * inputs["advantages"]


def ppo(lp: jax.Array, inputs: Inputs, config: Config) -> jax.Array:
    """L3: `-min(r·A, clip(r)·A)`."""
    ratio, adv = _ratio(lp, inputs), inputs["advantages"]
    clipped = jnp.clip(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -jnp.minimum(ratio * adv, clipped * adv)


def cispo(lp: jax.Array, inputs: Inputs, config: Config) -> jax.Array:
    """L4: `-sg(clip(r)) · lp · A`."""
    clipped = jnp.clip(_ratio(lp, inputs), config["clip_low_threshold"], config["clip_high_threshold"])
    return -jax.lax.stop_gradient(clipped) * lp * inputs["advantages"]


def dro(lp: jax.Array, inputs: Inputs, config: Config) -> jax.Array:
    """L5: `-(lp·A - ½·beta·(lp - q)²)`."""
    return -(lp * inputs["advantages"] - 0.5 * config["beta"] * (lp - inputs["logprobs"]) ** 2)


LOSS_FUNCTIONS = {f.__name__: f for f in (cross_entropy, importance_sampling, ppo, cispo, dro)}
