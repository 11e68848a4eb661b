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
from backends.jax.batch import Batch, Decoded, DecodeRows
from backends.jax.losses import LOSS_FUNCTIONS
from backends.jax.ops import Routing
from backends.jax.params import put_part, slot_axis, take_part
from bios.catalog import ModelSpec


def routing(slot: jax.Array, scale: jax.Array) -> Routing:
    """Routing of rows [B] whose adapters are `slot` [B] int32, indices into the A adapters of
    the LoRA arrays, given each adapter's alpha/rank `scale` [A]. The one place a Routing is built."""
    count = scale.shape[0]
    onehot = None if count == 1 else jax.nn.one_hot(slot, count, dtype=jnp.float32)
    return Routing(adapter=slot, scale=scale[slot], onehot=onehot)


def _take(tree: dict[str, jax.Array], slots: jax.Array, rank: int) -> dict[str, jax.Array]:
    """The compact LoRA state of `slots` [A] at `rank` columns: `[L, A, in, rank]`, ... (one gather each)."""
    return {k: take_part(v, k, slots, rank) for k, v in tree.items()}


def _put(tree: dict[str, jax.Array], new: dict[str, jax.Array], slots: jax.Array, rank: int) -> dict[str, jax.Array]:
    """`tree` with its `slots` [A] part at `rank` columns replaced by the compact `new` (in place when donated)."""
    return {k: put_part(v, k, slots, rank, new[k]) for k, v in tree.items()}


def _trainable(lora: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: v for k, v in lora.items() if k != "scale"}


def _per_token(
    spec: ModelSpec, base: dict, lora: dict, batch: Batch, loss_fn: str, dropout: bool, remat: bool = False
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    route = routing(batch.adapter, lora["scale"])
    if dropout and batch.dropout_seed is not None:
        keys = jax.vmap(jax.random.key)(batch.dropout_seed)
        route = Routing(route.adapter, route.scale, route.onehot, keys, batch.dropout_rate)
    hidden = model.hidden_states(spec, base, lora, batch.tokens, batch.positions, batch.segments, route, remat)
    lp = model.token_logprobs(base, lora, hidden, batch.targets, route, remat=remat)
    elementwise = LOSS_FUNCTIONS[loss_fn](lp, batch.inputs, batch.config, batch.segments) * batch.mask
    return jnp.sum(elementwise), (lp, elementwise)


@partial(jax.jit, static_argnames=("spec", "loss_fn", "rank"))
def forward(
    spec: ModelSpec, base: dict, lora: dict, adapters: jax.Array, batch: Batch, loss_fn: str, rank: int
) -> tuple[jax.Array, jax.Array]:
    """(logprobs [B, T], elementwise loss [B, T]) under the current adapters; no gradient, no dropout.

    lora: the whole slot table; only its `adapters` [A] slots, first `rank` columns, are read
    (`batch.adapter` indexes them)."""
    return _per_token(spec, base, _take(lora, adapters, rank), batch, loss_fn, dropout=False)[1]


@partial(jax.jit, static_argnames=("spec", "loss_fn", "rank", "remat"), donate_argnames=("accumulator",))
def forward_backward(
    spec: ModelSpec,
    base: dict,
    lora: dict,
    accumulator: dict,
    adapters: jax.Array,
    batch: Batch,
    loss_fn: str,
    rank: int,
    remat: bool = True,
) -> tuple[dict, jax.Array, jax.Array]:
    """L6/L8: (accumulator + d loss / d LoRA arrays, logprobs [B, T], elementwise [B, T]).
    `remat`: recompute each layer's activations in the backward pass instead of keeping them
    (batch.py `kept_activations` says what keeping them costs).

    The gradient is taken for the `adapters` [A] slots at `rank` columns only (columns beyond an
    adapter's rank have zero gradient) and added into the accumulator there, in place; a slot
    repeated in `adapters` to fill the bucket gets no rows, so adds zero."""
    grads, lp, elementwise = _gradient(spec, base, _take(lora, adapters, rank), batch, loss_fn, remat)
    added = {k: put_part(v, k, adapters, rank, grads[k], add=True) for k, v in accumulator.items()}
    return added, lp, elementwise


def _gradient(
    spec: ModelSpec, base: dict, active: dict, batch: Batch, loss_fn: str, remat: bool
) -> tuple[dict, jax.Array, jax.Array]:
    """(d loss / d compact LoRA arrays `active` (`_take`'s shapes), logprobs [B, T], elementwise [B, T])."""

    def total(params: dict) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        return _per_token(spec, base, {**params, "scale": active["scale"]}, batch, loss_fn, dropout=True, remat=remat)

    grads, (lp, elementwise) = jax.grad(total, has_aux=True)(_trainable(active))
    return grads, lp, elementwise


@partial(jax.jit, static_argnames=("spec", "loss_fn", "rank", "remat"))
def train_update(
    spec: ModelSpec,
    base: dict,
    lora: dict,
    opt_state: optimizer.State,
    accumulator: dict,
    adapters: jax.Array,
    batch: Batch,
    hyper: dict[str, jax.Array],
    loss_fn: str,
    rank: int,
    remat: bool = True,
) -> tuple[dict, optimizer.State, jax.Array, jax.Array, jax.Array]:
    """`forward_backward` and `adam_update` of the `adapters` [A] slots at `rank` columns as one
    program: each slot's update uses its pending accumulator plus this batch's gradient. A slot
    repeated in `adapters` to fill the bucket (the padding repeats one) is updated from its
    first place, which holds its rows' gradient. Pure: returns (new LoRA factors, new optimizer
    state, grad_norm [A], logprobs [B, T], elementwise [B, T]), the first two `write_back`'s inputs."""
    active = _take(lora, adapters, rank)
    grads, lp, elementwise = _gradient(spec, base, active, batch, loss_fn, remat)
    first = jnp.argmax(adapters[None, :] == adapters[:, None], axis=1)  # each place's first occurrence
    pending = _take(accumulator, adapters, rank)
    total = {k: pending[k] + jnp.take(g, first, axis=slot_axis(k)) for k, g in grads.items()}
    state = optimizer.take_slots(opt_state, adapters, rank)
    new_params, new_state, norms = optimizer.step(_trainable(active), state, total, hyper)
    return new_params, new_state, norms, lp, elementwise


@partial(jax.jit, static_argnames=("rank",))
def adam_update(
    lora: dict,
    opt_state: optimizer.State,
    accumulator: dict,
    hyper: dict[str, jax.Array],
    adapters: jax.Array,
    rank: int,
) -> tuple[dict, optimizer.State, jax.Array]:
    """O1–O5 for the `adapters` [A] slots (distinct, or a slot repeated with the same
    hyperparameters [A]) at `rank` columns, read from the whole tables and returned compact:
    (new LoRA factors, new optimizer state, grad_norm [A]), `write_back`'s inputs. Pure."""
    params, grads = _take(_trainable(lora), adapters, rank), _take(accumulator, adapters, rank)
    return optimizer.step(params, optimizer.take_slots(opt_state, adapters, rank), grads, hyper)


@partial(jax.jit, static_argnames=("rank",), donate_argnames=("lora", "opt_state", "accumulator"))
def write_back(
    lora: dict,
    opt_state: optimizer.State,
    accumulator: dict,
    new_params: dict,
    new_state: optimizer.State,
    adapters: jax.Array,
    rank: int,
) -> tuple[dict, optimizer.State, dict]:
    """The tables with `adam_update`'s compact result written into the `adapters` [A] slots
    at `rank` columns and those slots' accumulators cleared (L8), in place; other slots untouched.

    A program of its own: each table is then written only from its own compact part, which
    XLA updates in place, whereas an update that reads one donated table to write another
    (Adam reads moments, gradients and weights together) makes it copy every table whole."""
    return (
        {**_put(_trainable(lora), new_params, adapters, rank), "scale": lora["scale"]},
        optimizer.put_slots(opt_state, new_state, adapters, rank),
        _put(accumulator, jax.tree.map(jnp.zeros_like, new_params), adapters, rank),
    )


def train_step(
    spec: ModelSpec,
    base: dict,
    lora: dict,
    opt_state: optimizer.State,
    accumulator: dict,
    adapters: jax.Array,
    batch: Batch,
    hyper: dict[str, jax.Array],
    loss_fn: str,
    rank: int,
    remat: bool = True,
) -> tuple[dict, optimizer.State, dict, jax.Array, jax.Array, jax.Array, jax.Array]:
    """`forward_backward` then `optim_step` of the `adapters` [A] slots, in two programs instead
    of four (`train_update`, then `write_back` into the donated tables), with the same results.
    Returns (lora, opt_state, accumulator, logprobs [B, T], elementwise [B, T], grad_norm [A], steps [A])."""
    new_params, new_state, norms, lp, elementwise = train_update(
        spec, base, lora, opt_state, accumulator, adapters, batch, hyper, loss_fn, rank, remat
    )
    lora, opt_state, accumulator = write_back(lora, opt_state, accumulator, new_params, new_state, adapters, rank)
    return lora, opt_state, accumulator, lp, elementwise, norms, optimizer.step_count(new_state)


def optim_step(
    lora: dict,
    opt_state: optimizer.State,
    accumulator: dict,
    hyper: dict[str, jax.Array],
    adapters: jax.Array,
    rank: int,
) -> tuple[dict, optimizer.State, dict, jax.Array, jax.Array]:
    """O1–O5 on the `adapters` [A] slots at `rank` columns (`adam_update`), then written into the
    donated tables with those slots' accumulators cleared (`write_back`). Other slots are not
    touched. Returns (lora, opt_state, accumulator, grad_norm [A], steps [A])."""
    new_params, new_state, norms = adam_update(lora, opt_state, accumulator, hyper, adapters, rank)
    lora, opt_state, accumulator = write_back(lora, opt_state, accumulator, new_params, new_state, adapters, rank)
    return lora, opt_state, accumulator, norms, optimizer.step_count(new_state)


@partial(jax.jit, static_argnames=("rank",))
def compact(lora: dict, adapters: jax.Array, rank: int) -> dict:
    """The LoRA state of the `adapters` [A] slots at `rank` columns (`[L, A, in, rank]`, ...,
    scale [A]): what `extend` reads, for a sampling call that uses only those adapters."""
    return _take(lora, adapters, rank)


@jax.jit
def slot_state(lora: dict, opt_state: optimizer.State, slot: jax.Array) -> tuple[dict, dict, dict, jax.Array]:
    """Slot `slot`'s LoRA factors (slot axis removed, every column: `lora.<module>.a` [L, in, R],
    ...), its Adam first and second moments (the same, from the optimizer's slot-major trees)
    and its step count: what an export of the adapter reads, gathered by one program."""
    mu, nu = optimizer.adam_moments(opt_state)
    weights = {k: jnp.take(v, slot, axis=slot_axis(k)) for k, v in lora.items() if k != "scale"}
    first, second = ({k: v[slot] for k, v in moments.items()} for moments in (mu, nu))
    return weights, first, second, optimizer.step_count(opt_state)[slot]


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

    lora: compact LoRA state (`compact`) of A adapters; token_slot [B*T] int32: each token's
    adapter among them, the same for all tokens of a row; rows may use them in any order."""
    b, t = tokens.shape
    row_slot = token_slot.reshape(b, t)[:, 0]
    return model.extend(spec, base, lora, tokens, start, cache, routing(row_slot, lora["scale"]))


@partial(jax.jit, donate_argnames=("cache",))
def copy_rows(
    cache: tuple[jax.Array, jax.Array], source: tuple[jax.Array, jax.Array], to: jax.Array, rows: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Cache rows `to` [n] (in place) ← rows `rows` [n] of `source`; both caches [L, B, C, K, E]."""
    (keys, values), (new_keys, new_values) = cache, source
    return keys.at[:, to].set(new_keys[:, rows]), values.at[:, to].set(new_values[:, rows])


def _kept(z: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] bool in vocabulary order: the tokens S2's top-k then top-p filters keep of each row
    of tempered logits z [B, V] (ranked by z descending, ties by lower id; the first always kept)."""
    batch, vocab = z.shape
    order = jnp.argsort(-z, axis=-1, stable=True)
    sorted_z = jnp.take_along_axis(z, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    in_top_k = rank < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_z, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    kept = in_top_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (rank == 0))
    return jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], order].set(kept)


def _next_tokens(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    keys: jax.Array,
    index: jax.Array,
    step: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """S1 and S2 for every row (pure): see `choose`, which compiles it alone; `decode` runs it per step.

    A sampled row draws by inverting the cumulative distribution of its kept tokens (in id
    order) at one uniform number from its key, so a row's draw does not depend on the other
    rows and costs one random number, not one per vocabulary entry; the vocabulary is sorted
    (`_kept`) only when some sampled row filters by top-k or top-p."""
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1)
    sampled = temperature > 0
    z = logits / jnp.where(sampled, temperature, 1.0)[:, None]
    filtering = jnp.any(sampled & ((top_k < vocab) | (top_p < 1.0)))
    kept = jax.lax.cond(
        filtering, lambda: _kept(z, top_k, top_p), lambda: jnp.ones(z.shape, bool)
    )  # equal for a row that does not filter
    row_keys = jax.vmap(lambda key, j, s: jax.random.fold_in(jax.random.fold_in(key, j), s))(keys, index, step)
    uniform = jax.vmap(jax.random.uniform)(row_keys)  # [B] in [0, 1)
    weights = jnp.where(kept, jnp.exp(z - jnp.max(z, axis=-1, keepdims=True)), 0.0)  # the most likely: 1
    cumulative = jnp.cumsum(weights, axis=-1)
    # The first token whose cumulative weight exceeds the drawn fraction of the total: a token
    # of weight 0 never is; rounding can leave none, then the last kept token is drawn.
    drawn = jnp.sum(cumulative <= (uniform * cumulative[:, -1])[:, None], axis=-1)
    last_kept = vocab - 1 - jnp.argmax(kept[:, ::-1], axis=-1)
    token = jnp.where(sampled, jnp.minimum(drawn, last_kept), greedy).astype(jnp.int32)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logprob


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
    return _next_tokens(logits, temperature, top_k, top_p, keys, index, step)


@partial(jax.jit, static_argnames=("spec", "chunk"), donate_argnames=("cache",))
def decode(
    spec: ModelSpec,
    base: dict,
    lora: dict,
    logits: jax.Array,
    cache: tuple[jax.Array, jax.Array],
    rows: DecodeRows,
    chunk: int,
) -> tuple[Decoded, tuple[jax.Array, jax.Array]]:
    """Up to `chunk` decode steps of every live row, on device (S1, S2 and S3's stop token ids
    and token limits); a row that stops is frozen. Stops early once every row is done, or once
    `rows.wanted` rows are done (so waiting requests can be admitted).

    lora: compact LoRA state (`compact`); `rows.slot` [B]: each row's adapter among its A.
    logits [B, V] float32: each row's next-token logits; cache: [L, B, C, K, E] pairs (donated).
    Each step chooses every live row's token as `choose` does (step = tokens it has generated),
    stores it, stops the row on a stop token id or at its limit, and otherwise feeds the token
    at the row's next cache position; done rows feed token 0 at position 0 of adapter 0, whose
    cache row is rewritten on admission. Returns (`Decoded`, the new cache).
    """
    batch = logits.shape[0]
    capacity = cache[0].shape[2]

    def running(state: tuple) -> jax.Array:
        i, _, _, _, _, done, _ = state
        return (i < chunk) & (jnp.sum(done) < jnp.minimum(rows.wanted, batch))

    def step(state: tuple) -> tuple:
        i, logits, cache, tokens, logprobs, done, count = state
        live = ~done
        token, logprob = _next_tokens(
            logits, rows.temperature, rows.top_k, rows.top_p, rows.keys, rows.sample_index, rows.generated + count
        )
        tokens = tokens.at[:, i].set(jnp.where(live, token, 0))
        logprobs = logprobs.at[:, i].set(jnp.where(live, logprob, 0.0))
        count = count + live
        stops = jnp.any(rows.stop == token[:, None], axis=-1) | (rows.generated + count >= rows.limit)
        done = done | (live & stops)
        fed = jnp.where(done, 0, token)
        start = jnp.where(done, 0, jnp.minimum(rows.position + count, capacity - 1))
        slot = jnp.where(done, 0, rows.slot)

        logits, cache = model.extend(spec, base, lora, fed[:, None], start, cache, routing(slot, lora["scale"]))
        return i + 1, logits[:, 0], cache, tokens, logprobs, done, count

    state = (
        jnp.int32(0),
        logits,
        cache,
        jnp.zeros((batch, chunk), jnp.int32),
        jnp.zeros((batch, chunk), jnp.float32),
        ~rows.busy,
        jnp.zeros(batch, jnp.int32),
    )
    _, logits, cache, tokens, logprobs, done, count = jax.lax.while_loop(running, step, state)
    return Decoded(tokens, logprobs, count, done, logits), cache


class _Compiled(Protocol):
    """What `jax.jit` returns, as far as counting its programs goes."""

    def _cache_size(self) -> int: ...


PROGRAMS = {
    "forward": forward,
    "forward_backward": forward_backward,
    "adam_update": adam_update,
    "write_back": write_back,
    "train_update": train_update,
    "compact": compact,
    "slot_state": slot_state,
    "extend": extend,
    "copy_rows": copy_rows,
    "choose": choose,
    "decode": decode,
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
    """A device array as a host numpy array (waits for it); see `host_all`."""
    return host_all(array)[0]


def host_all(*arrays: jax.Array) -> tuple[np.ndarray, ...]:
    """Device arrays as host numpy arrays, fetched together in one transfer (waits for them).
    An array split over several processes is gathered from all of them: every process must
    then call this together."""
    if all(a.is_fully_addressable for a in arrays):
        return tuple(np.asarray(a) for a in jax.device_get(arrays))
    return tuple(_gathered(a) for a in arrays)


def _gathered(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    if array.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
