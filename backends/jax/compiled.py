"""The compiled programs of the JAX backend — the only module that calls `jax.jit`.

Shapes reaching a program are bucketed (batch.py `bucket`), so a training loop with varying
batch sizes and lengths compiles a handful of programs; buffers updated in place (gradient
accumulators, LoRA state, optimizer state, KV caches) are donated. Loss names and the model
spec are static; loss configurations and per-slot hyperparameters are traced arrays, so
changing them never recompiles.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from backends.jax import model, optimizer
from backends.jax.batch import Batch
from backends.jax.losses import LOSS_FUNCTIONS
from backends.jax.ops import Routing
from bios.catalog import ModelSpec


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
    (keys, values), (new_keys, new_values) = cache, source
    return keys.at[:, to].set(new_keys[:, rows]), values.at[:, to].set(new_values[:, rows])


@jax.jit
def choose(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    keys: jax.Array,
    index: jax.Array,
    step: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """S1 and S2 for every row: the next token [B] int32 and `log_softmax(logits)[token]` [B] float32.

    logits [B, V]: raw (temperature 1). temperature, top_p [B] float32 (temperature 0 takes
    the argmax, lowest id on ties); top_k [B] int32 in 1..V (V keeps all). A row draws with its
    item's key [B] folded with its sample index [B] and then with its own step [B] (tokens it
    has generated), so a seed gives the same tokens however requests are batched.
    """
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1)
    z = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    order = jnp.argsort(-z, axis=-1, stable=True)  # descending, ties by lower id
    sorted_z = jnp.take_along_axis(z, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    in_top_k = rank < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_z, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    kept = in_top_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (rank == 0))
    row_keys = jax.vmap(lambda key, j, s: jax.random.fold_in(jax.random.fold_in(key, j), s))(keys, index, step)
    pick = jax.vmap(jax.random.categorical)(row_keys, jnp.where(kept, sorted_z, -jnp.inf))
    drawn = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]
    token = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logprob


class _Compiled(Protocol):
    """What `jax.jit` returns, as far as counting its programs goes."""

    def _cache_size(self) -> int: ...


PROGRAMS = {
    "forward": forward,
    "forward_backward": forward_backward,
    "optim_step": optim_step,
    "extend": extend,
    "copy_rows": copy_rows,
    "choose": choose,
}
"""Every jitted function of the backend, by name (tests check none is missing)."""


def compile_counts() -> dict[str, int]:
    """How many programs each compiled function holds (for tests and benchmarks)."""
    return {name: cast(_Compiled, function)._cache_size() for name, function in PROGRAMS.items()}


def use_persistent_cache(directory: str) -> None:
    """Keep every compiled program, however quick to compile, in JAX's persistent cache in
    `directory`, so later processes load it instead of compiling. Sets JAX's process-wide
    configuration; has no effect on a process that already opened a cache elsewhere."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def host(array: jax.Array) -> np.ndarray:
    """A device array as a host numpy array (waits for it). An array split over several
    processes is gathered from all of them: every process must then call this together."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    if array.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
