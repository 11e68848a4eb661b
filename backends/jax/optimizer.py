"""Per-slot Adam(W) with global-norm clipping (docs/losses.md O1–O5), built from Optax.

Each adapter slot has its own optimizer state (moments and step count) and its own
hyperparameters: the Optax chain `clip_by_global_norm → adamw` is vmapped over the slot axis,
and only the slots being stepped are written back, so a step never touches, and weight decay
never reaches, another tenant's adapter. Memory grows linearly with the number of slots.

Trainable arrays are layer-major (`[L, S, ...]`, lm_head `[S, ...]`; params.py); the optimizer
works on a slot-major view (`[S, ...]` for every leaf).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Tree = dict[str, jax.Array]
HYPERPARAMETERS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")


def slot_axis(name: str) -> int:
    """The slot axis of trainable array `name`: 0 for lm_head, 1 for the layer-stacked ones."""
    return 0 if name.startswith("lora.lm_head") else 1


def to_slot_major(tree: Tree) -> Tree:
    return {k: jnp.moveaxis(v, slot_axis(k), 0) for k, v in tree.items()}


def to_layer_major(tree: Tree) -> Tree:
    return {k: jnp.moveaxis(v, 0, slot_axis(k)) for k, v in tree.items()}


def clear_slots(tree: Tree, active: jax.Array) -> Tree:
    """`tree` (layer-major) with the `active` [S] slots set to zero."""

    def clear(name: str, value: jax.Array) -> jax.Array:
        axis = slot_axis(name)
        mask = active.reshape((1,) * axis + (-1,) + (1,) * (value.ndim - axis - 1))
        return jnp.where(mask, jnp.zeros_like(value), value)

    return {name: clear(name, value) for name, value in tree.items()}


def _transform(hyper: dict[str, jax.Array]) -> optax.GradientTransformation:
    """O2–O5 for one slot; a clip norm of 0 disables clipping (O2)."""
    max_norm = jnp.where(hyper["grad_clip_norm"] > 0, hyper["grad_clip_norm"], jnp.inf)
    return optax.chain(
        optax.clip_by_global_norm(max_norm),
        optax.adamw(
            hyper["learning_rate"],
            b1=hyper["beta1"],
            b2=hyper["beta2"],
            eps=hyper["eps"],
            weight_decay=hyper["weight_decay"],
        ),
    )


def init_state(trainable: Tree) -> optax.OptState:
    """Zero moments and step 0 for every slot; leaves slot-major."""
    dummy = dict.fromkeys(HYPERPARAMETERS, jnp.float32(0.0))
    return jax.vmap(lambda params: _transform(dummy).init(params))(to_slot_major(trainable))


def slot_steps(state: optax.OptState) -> jax.Array:
    """[S] int32 number of updates applied to each slot."""
    return state[1][0].count


def step(
    trainable: Tree, state: optax.OptState, grads: Tree, hyper: dict[str, jax.Array], active: jax.Array
) -> tuple[Tree, optax.OptState, jax.Array]:
    """One Adam(W) update of the `active` [S] slots (hyper: [S] arrays by HYPERPARAMETERS name).

    Returns (new trainable, new state, grad_norm [S] before clipping). Inactive slots are
    returned unchanged, state included.
    """
    params_s, grads_s = to_slot_major(trainable), to_slot_major(grads)

    def one_slot(
        params: Tree, opt: optax.OptState, g: Tree, h: dict[str, jax.Array]
    ) -> tuple[Tree, optax.OptState, jax.Array]:
        updates, new_opt = _transform(h).update(g, opt, params)
        return optax.apply_updates(params, updates), new_opt, optax.tree.norm(g)

    new_params, new_state, norms = jax.vmap(one_slot)(params_s, state, grads_s, hyper)

    def keep(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    return to_layer_major(jax.tree.map(keep, new_params, params_s)), jax.tree.map(keep, new_state, state), norms
