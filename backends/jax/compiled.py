"""The compiled programs of the JAX backend — the only module that calls `jax.jit`.

Shapes reaching a program are bucketed (`bucket`), so a training loop with varying batch
sizes and lengths compiles a handful of programs; buffers updated in place (gradient
accumulators, LoRA state, optimizer state, KV caches) are donated. Loss names and the model
spec are static; loss configurations and per-slot hyperparameters are traced arrays, so
changing them never recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from backends.jax import model, optimizer
from backends.jax.losses import LOSS_FUNCTIONS
from backends.jax.ops import Routing
from bios.catalog import ModelSpec

MIN_TOKENS = 16
MIN_ROWS = 4


def bucket(n: int, minimum: int = 1, multiple: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), rounded up to `multiple`, at most `cap` (if >= n)."""
    size = max(minimum, 1 << max(0, int(n - 1).bit_length()))
    size = -(-size // multiple) * multiple
    return max(n, min(size, cap)) if cap is not None else size


@dataclass(frozen=True)
class Batch:
    """A padded, slot-sorted batch: rows B, tokens T (both bucketed), N = B*T.

    tokens, targets: [B, T] int32; mask: [B, T] float32 (0 on padding); inputs: the loss's
    per-token inputs [B, T]; config: the loss's settings, each [B, 1]; token_slot: [N] int32.
    With LoRA dropout, dropout_seed [B] uint32 seeds each row's masks and dropout_rate [B] is
    its adapter's rate (both None when no row of the batch uses dropout).
    """

    tokens: jax.Array
    targets: jax.Array
    mask: jax.Array
    inputs: dict[str, jax.Array]
    config: dict[str, jax.Array]
    token_slot: jax.Array
    dropout_seed: jax.Array | None = None
    dropout_rate: jax.Array | None = None


jax.tree_util.register_dataclass(
    Batch,
    data_fields=["tokens", "targets", "mask", "inputs", "config", "token_slot", "dropout_seed", "dropout_rate"],
    meta_fields=[],
)


def routing(token_slot: jax.Array, scale: jax.Array, *, sort: bool = False) -> Routing:
    """Routing of tokens [N] given each slot's alpha/rank [S]; `sort` when they are not
    already ordered by slot (decode rows come and go in any order)."""
    counts = jnp.sum(jax.nn.one_hot(token_slot, scale.shape[0], dtype=jnp.int32), axis=0)
    order = jnp.argsort(token_slot, stable=True) if sort else None
    return Routing(group_sizes=counts, token_scale=scale[token_slot], order=order)


def _trainable(lora: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: v for k, v in lora.items() if k != "scale"}


def _per_token(
    spec: ModelSpec, base: dict, lora: dict, batch: Batch, loss_fn: str, dropout: bool
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    route = routing(batch.token_slot, lora["scale"])
    if dropout and batch.dropout_seed is not None:
        keys = jax.vmap(jax.random.key)(batch.dropout_seed)
        route = Routing(route.group_sizes, route.token_scale, route.order, keys, batch.dropout_rate)
    hidden = model.hidden_states(spec, base, lora, batch.tokens, route)
    lp = model.token_logprobs(base, lora, hidden, batch.targets, route, batch.token_slot)
    elementwise = LOSS_FUNCTIONS[loss_fn](lp, batch.inputs, batch.config) * batch.mask
    return jnp.sum(elementwise), (lp, elementwise)


@partial(jax.jit, static_argnames=("spec", "loss_fn"))
def forward(spec: ModelSpec, base: dict, lora: dict, batch: Batch, loss_fn: str) -> tuple[jax.Array, jax.Array]:
    """(logprobs [B, T], elementwise loss [B, T]) under the current adapters; no gradient, no dropout."""
    return _per_token(spec, base, lora, batch, loss_fn, dropout=False)[1]


@partial(jax.jit, static_argnames=("spec", "loss_fn"), donate_argnames=("accumulator",))
def forward_backward(
    spec: ModelSpec, base: dict, lora: dict, accumulator: dict, batch: Batch, loss_fn: str
) -> tuple[dict, jax.Array, jax.Array]:
    """L6/L8: (accumulator + d loss / d trainable LoRA arrays, logprobs [B, T], elementwise [B, T])."""
    trainable = _trainable(lora)

    def total(params: dict) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        return _per_token(spec, base, {**params, "scale": lora["scale"]}, batch, loss_fn, dropout=True)

    grads, (lp, elementwise) = jax.grad(total, has_aux=True)(trainable)
    return jax.tree.map(jnp.add, accumulator, grads), lp, elementwise


@partial(jax.jit, donate_argnames=("lora", "opt_state", "accumulator"))
def optim_step(
    lora: dict, opt_state: optimizer.State, accumulator: dict, hyper: dict[str, jax.Array], active: jax.Array
) -> tuple[dict, optimizer.State, dict, jax.Array, jax.Array]:
    """O1–O5 on the active [S] slots, then their accumulators are cleared (L8).

    Returns (lora, opt_state, accumulator, grad_norm [S], steps [S]).
    """
    trainable, new_state, norms = optimizer.step(_trainable(lora), opt_state, accumulator, hyper, active)
    cleared = optimizer.clear_slots(accumulator, active)
    return {**trainable, "scale": lora["scale"]}, new_state, cleared, norms, optimizer.step_count(new_state)


@partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache",))
def extend(
    spec: ModelSpec,
    base: dict,
    lora: dict,
    tokens: jax.Array,
    start: jax.Array,
    cache: tuple[jax.Array, jax.Array],
    token_slot: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Feed tokens [B, T] at per-row positions start [B]; (logits [B, T, V] float32, new KV cache).
    Rows may use their adapters in any order (token_slot [B*T] need not be sorted)."""
    return model.extend(
        spec, base, lora, tokens, start, cache, routing(token_slot, lora["scale"], sort=True), token_slot
    )


@partial(jax.jit, donate_argnames=("cache",))
def copy_rows(
    cache: tuple[jax.Array, jax.Array], source: tuple[jax.Array, jax.Array], to: jax.Array, rows: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Cache rows `to` [n] (in place) ← rows `rows` [n] of `source`; both caches [L, B, C, K, E]."""
    return tuple(c.at[:, to].set(s[:, rows]) for c, s in zip(cache, source, strict=True))


def compile_counts() -> dict[str, int]:
    """How many programs each compiled function holds (for tests and benchmarks)."""
    return {f.__name__: f._cache_size() for f in (forward, forward_backward, optim_step, extend, copy_rows)}


def host(array: jax.Array) -> np.ndarray:
    """A device array as a host numpy array (waits for it)."""
    return np.asarray(jax.device_get(array))
