"""Per-slot Adam(W) with global-norm clipping (docs/losses.md O1–O5), built from Optax.

Each adapter slot has its own optimizer state (moments and step count) and its own
hyperparameters: the Optax chain `clip_by_global_norm → adamw` is vmapped over the slot axis
of the slots being stepped (`take_slots` → `step` → `put_slots`, at the adapters' rank), so a
step never touches, and weight decay never reaches, another tenant's adapter, and its work
follows the stepped adapters only. Memory grows linearly with the number of slots.

Trainable arrays are layer-major (`[L, S, ...]`, lm_head `[S, ...]`; params.py); the optimizer
works on a slot-major view (`[S, ...]` for every leaf).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from backends.jax.params import put_part, slot_axis, take_part

Tree = dict[str, jax.Array]
State = tuple[optax.OptState, tuple[optax.OptState, ...]]
"""The Optax state of `clip_by_global_norm → adamw`, every leaf slot-major: (clipping state,
(Adam state, weight-decay state, learning-rate state)). Read and written only through
`step_count`, `adam_moments` and `with_moments` below."""
HYPERPARAMETERS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")


def to_slot_major(tree: Tree) -> Tree:
    return {k: jnp.moveaxis(v, slot_axis(k), 0) for k, v in tree.items()}


def to_layer_major(tree: Tree) -> Tree:
    return {k: jnp.moveaxis(v, 0, slot_axis(k)) for k, v in tree.items()}


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


def init_state(trainable: Tree) -> State:
    """Zero moments and step 0 for every slot; leaves slot-major."""
    dummy = dict.fromkeys(HYPERPARAMETERS, jnp.float32(0.0))
    return jax.vmap(lambda params: _transform(dummy).init(params))(to_slot_major(trainable))


def _adam(state: State) -> optax.ScaleByAdamState:
    adam = state[1][0]
    if not isinstance(adam, optax.ScaleByAdamState):
        raise TypeError(f"not the state of clip_by_global_norm → adamw: {type(adam).__name__}")
    return adam


def step_count(state: State) -> jax.Array:
    """[S] int32: the number of updates applied to each slot (Adam's bias-correction count)."""
    return _adam(state).count


def adam_moments(state: State) -> tuple[Tree, Tree]:
    """(first moments, second moments) of every slot, slot-major (`[S, ...]` per leaf)."""
    adam = _adam(state)
    return adam.mu, adam.nu


def with_moments(state: State, count: jax.Array, mu: Tree, nu: Tree) -> State:
    """`state` with Adam's step count [S] and moments (slot-major) replaced; pure."""
    clipping, (_, *rest) = state
    return clipping, (_adam(state)._replace(count=count, mu=mu, nu=nu), *rest)


def take_slots(state: State, slots: jax.Array, rank: int) -> State:
    """The state of the `slots` [A] only, moments at their first `rank` columns (a gather each)."""
    adam = _adam(state)
    take = lambda tree: {k: take_part(v, k, slots, rank, axis=0) for k, v in tree.items()}
    return with_moments(state, adam.count[slots], take(adam.mu), take(adam.nu))


def put_slots(state: State, part: State, slots: jax.Array, rank: int) -> State:
    """`state` with the `slots` [A] part (at `rank` columns) replaced by `part` (`take_slots`'s shape)."""
    adam, new = _adam(state), _adam(part)

    def put(tree: Tree, values: Tree) -> Tree:
        return {k: put_part(v, k, slots, rank, values[k], axis=0) for k, v in tree.items()}

    return with_moments(state, adam.count.at[slots].set(new.count), put(adam.mu, new.mu), put(adam.nu, new.nu))


def step(trainable: Tree, state: State, grads: Tree, hyper: dict[str, jax.Array]) -> tuple[Tree, State, jax.Array]:
    """One Adam(W) update of every slot of `trainable` (layer-major) and `state` (slot-major),
    slot s with hyperparameters `hyper[name][s]` ([S] arrays by HYPERPARAMETERS name).

    Returns (new trainable, new state, grad_norm [S] before clipping). Pure.
    """
    params_s, grads_s = to_slot_major(trainable), to_slot_major(grads)

    def one_slot(
        params: Tree, opt: optax.OptState, g: Tree, h: dict[str, jax.Array]
    ) -> tuple[Tree, optax.OptState, jax.Array]:
        updates, new_opt = _transform(h).update(g, opt, params)
        return optax.apply_updates(params, updates), new_opt, optax.tree.norm(g)

    new_params, new_state, norms = jax.vmap(one_slot)(params_s, state, grads_s, hyper)
    return to_layer_major(new_params), new_state, norms
