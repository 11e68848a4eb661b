"""Sampling of docs/losses.md S1–S3 on the JAX backend, continuously batched.

A `DecodePool` of rows shares one KV cache. Waiting requests are admitted (first come, first
served) whenever enough rows are free: their prompts are prefilled together, once per request,
and the prefilled cache row is copied into each of the request's `num_samples` rows. The busy
rows then decode on device a chunk of up to `CHUNK` tokens at a time (`compiled.decode`: S1,
S2, and S3's stop token ids and token limits); the host reads each chunk back at once, checks
stop strings on the new tokens only (`StopStrings`), retires the rows that stopped, reports a
request whose rows have all stopped (`on_result`) and gives its rows to the next waiting one.
Rows may serve different adapters in any order. Row counts and lengths are bucketed so few
programs compile.

Shapes: B rows, T tokens, V vocab, C cache capacity, L layers, K kv heads, E head dim.
"""

from __future__ import annotations

import functools
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from backends.jax import compiled
from backends.jax.batch import DecodeRows, bucket
from backends.jax.stop_strings import StopStrings
from bios.backend import SampledOutput, SampleOutput, SampleWork
from bios.catalog import ModelSpec
from bios.tokenizer import Tokenizer
from bios.types import StopReason

MIN_PROMPT = 16
"""Smallest prompt-length bucket of the prefill."""
MAX_ROWS = 64
"""Decode rows of the pool at most (more requests wait for free rows)."""
MIN_STOP_IDS = 4
"""Smallest bucket of stop token ids per row (more ids compile one more decode program)."""
CHUNK = 32
"""Decode steps per device call at most. Rows stop on device at their token limit and the call
returns as soon as every row is done (or, while requests wait, as soon as enough rows are free
for the first of them), so short requests never run the whole chunk and one program serves
every length; a longer chunk would only save host round trips (one per 32 tokens already) at
the price of more tokens decoded past a stop string, which only the host sees."""


def _item_key(seed: int | None) -> jax.Array:
    """`jax.random.key` of the seed's low 32 bits, folded with each higher 32-bit word so that
    seeds of any size stay distinct; seed None draws 64 bits of fresh entropy."""
    seed = secrets.randbits(64) if seed is None else seed
    key = jax.random.key(seed & 0xFFFFFFFF)
    for shift in range(32, seed.bit_length(), 32):
        key = jax.random.fold_in(key, (seed >> shift) & 0xFFFFFFFF)
    return key


def _prompt_logprobs(logits: jax.Array, prompts: np.ndarray) -> np.ndarray:
    """[P, T] with entry t = log p(prompt[t] | prompt[:t]) (t >= 1) from prefill logits [P, T, V]."""
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return compiled.host(jnp.take_along_axis(lp, jnp.asarray(prompts[:, 1:, None]), axis=-1)[..., 0])


def _top_prompt_logprobs(logits: jax.Array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens after each prompt prefix, from one prompt's prefill logits
    [T, V]: (ids [T-1, k] int64, logprobs [T-1, k] float32), most likely first."""
    values, ids = jax.lax.top_k(jax.nn.log_softmax(logits[:-1], axis=-1), k)
    return compiled.host(ids).astype(np.int64), compiled.host(values).astype(np.float32)


@dataclass
class _Request:
    """One work item being sampled: its settings and its samples as they finish."""

    index: int
    """Its position among the items of the `sample` call."""
    work: SampleWork
    slot: int
    """Adapter slot (0: the bare base model)."""
    limit: int
    """Tokens each sample may generate: max_tokens, fewer where the prompt nears max_seq_len."""
    top_k: int
    """S2's k in 1..V (V keeps the whole vocabulary)."""
    finished: dict[int, SampledOutput] = field(default_factory=dict)
    """Finished samples by sample index."""
    prompt_logprobs: np.ndarray | None = None
    """[T-1] float32 log p(prompt[t] | prompt[:t]) for t >= 1, when the work asks for them."""
    topk_prompt: tuple[np.ndarray, np.ndarray] | None = None
    """The work's top-k prompt logprobs (`SampleOutput.topk_prompt`), when it asks for them."""

    stop_strings: StopStrings | None = None
    """Its stop strings' checker, when it has any."""

    @property
    def prompt_length(self) -> int:
        return len(self.work.prompt)

    def output(self) -> SampleOutput:
        """The result, samples in index order; `prompt_logprobs` [T] has NaN at 0."""
        sequences = tuple(self.finished[j] for j in range(self.work.num_samples))
        prompt_lp = None
        if self.prompt_logprobs is not None:
            prompt_lp = np.concatenate([[np.nan], self.prompt_logprobs]).astype(np.float32)
        return SampleOutput(sequences, prompt_lp, self.topk_prompt)


@dataclass
class _Sample:
    """The sample a busy decode row is generating."""

    request: _Request
    index: int
    """Sample index j within its request (folded into its random key)."""
    tokens: list[int] = field(default_factory=list)
    """Tokens generated so far."""
    logprobs: list[float] = field(default_factory=list)
    """S2 logprob of each generated token."""

    def add(self, tokens: np.ndarray, logprobs: np.ndarray, done: bool) -> StopReason | None:
        """Append a chunk's new tokens [n] and logprobs [n] (`done`: the device stopped the row,
        on a stop token id or at its limit); S3's reason if the sample has stopped — then its
        tokens end at the first token that completes a stop string — or None to go on."""
        checked = len(self.tokens)
        self.tokens += tokens.tolist()
        self.logprobs += logprobs.tolist()
        strings = self.request.stop_strings
        end = None if strings is None else strings.first_stop(self.tokens, checked)
        if end is not None:
            del self.tokens[end + 1 :], self.logprobs[end + 1 :]
            return "stop"
        if done:
            return "stop" if self.tokens[-1] in self.request.work.stop_token_ids else "length"
        return None

    def finish(self, reason: StopReason) -> None:
        """Hand the finished sequence to its request."""
        tokens, logprobs = np.asarray(self.tokens, np.int64), np.asarray(self.logprobs, np.float32)
        self.request.finished[self.index] = SampledOutput(tokens, logprobs, reason)


class DecodePool:
    """Decode rows over one KV cache (keys, values: [L, B, C, K, E]); each row is free or
    generates one `_Sample`. The only mutable state of sampling; one pool per `sample` call.

    `admit` prefills requests into free rows; `run` decodes a chunk of every busy row's
    tokens and retires the rows that stopped. The pool never changes shape.
    """

    def __init__(
        self,
        spec: ModelSpec,
        base: dict[str, jax.Array],
        lora: dict[str, jax.Array],
        dtype: jnp.dtype,
        rows: int,
        capacity: int,
    ) -> None:
        self.spec, self.base, self.lora, self.dtype, self.capacity = spec, base, lora, dtype, capacity
        self.cache = self._empty_cache(rows)
        self.logits = jnp.zeros((rows, spec.vocab_size), jnp.float32)
        """[B, V] float32: the next-token logits of every row."""
        self.keys = jnp.stack([_item_key(0)] * rows)
        """[B] random keys: each busy row's request key."""
        self.rows: list[_Sample | None] = [None] * rows

    def _empty_cache(self, rows: int) -> tuple[jax.Array, jax.Array]:
        spec = self.spec
        shape = (spec.n_layers, rows, self.capacity, spec.n_kv_heads, spec.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def free(self) -> list[int]:
        """The free rows, ascending."""
        return [r for r, sample in enumerate(self.rows) if sample is None]

    @property
    def busy(self) -> bool:
        """Whether any row is generating."""
        return any(sample is not None for sample in self.rows)

    def admit(self, requests: list[_Request]) -> None:
        """Prefill `requests` together and start each of their samples in a free row (the
        lowest first); their samples must fit in the free rows. Fills prompt logprobs."""
        if not requests:
            return
        logits, fresh, prompts = self._prefill(requests)
        free, to, source = self.free(), [], []
        for p, request in enumerate(requests):
            n = request.prompt_length
            if request.work.prompt_logprobs:
                request.prompt_logprobs = _prompt_logprobs(logits[p : p + 1, :n], prompts[p : p + 1, :n])[0]
            if request.work.topk_prompt_logprobs:
                request.topk_prompt = _top_prompt_logprobs(logits[p, :n], request.work.topk_prompt_logprobs)
            for j in range(request.work.num_samples):
                row = free.pop(0)
                self.rows[row] = _Sample(request, j)
                to.append(row)
                source.append(p)
        padded = bucket(len(to))
        to_rows = np.array(to + [to[-1]] * (padded - len(to)), np.int32)
        from_rows = np.array(source + [source[-1]] * (padded - len(source)), np.int32)
        self.cache = compiled.copy_rows(self.cache, fresh, to_rows, from_rows)
        last = np.array([requests[p].prompt_length - 1 for p in from_rows])
        self.logits = self.logits.at[to_rows].set(logits[from_rows, last])
        self.keys = self.keys.at[to_rows].set(jnp.stack([_item_key(requests[p].work.seed) for p in from_rows]))

    def _prefill(self, requests: list[_Request]) -> tuple[jax.Array, tuple[jax.Array, jax.Array], np.ndarray]:
        """(logits [P, W, V], a fresh cache of P rows holding the prompts, prompts [P, W] int32),
        P and W bucketed, prompt p in row p."""
        width = bucket(max(r.prompt_length for r in requests), minimum=MIN_PROMPT, cap=self.capacity)
        count = bucket(len(requests))
        prompts = np.zeros((count, width), np.int32)
        slots = np.zeros(count, np.int32)
        for p, request in enumerate(requests):
            prompts[p, : request.prompt_length], slots[p] = request.work.prompt, request.slot
        logits, fresh = compiled.extend(
            self.spec,
            self.base,
            self.lora,
            prompts,
            np.zeros(count, np.int32),
            self._empty_cache(count),
            np.repeat(slots, width),
        )
        return logits, fresh, prompts

    def run(self, wanted: int) -> list[_Request]:
        """One chunk of decoding (S1–S3) on every busy row, returning once all are done or once
        `wanted` rows are free (more than are free now, or the chunk would run no step); retires
        the rows that stopped. Returns the requests this chunk completed, in row order."""
        decoded, self.cache = compiled.decode(
            self.spec, self.base, self.lora, self.logits, self.cache, self._settings(wanted), CHUNK
        )
        self.logits = decoded.logits
        tokens, logprobs, lengths, done = compiled.host_all(
            decoded.tokens, decoded.logprobs, decoded.lengths, decoded.done
        )
        completed = []
        for r, sample in enumerate(self.rows):
            if sample is None:
                continue
            reason = sample.add(tokens[r, : lengths[r]], logprobs[r, : lengths[r]], bool(done[r]))
            if reason is not None:
                sample.finish(reason)
                self.rows[r] = None
                if len(sample.request.finished) == sample.request.work.num_samples:
                    completed.append(sample.request)
        return completed

    def _settings(self, wanted: int) -> DecodeRows:
        """Every row's decode settings; free rows are done from the start, with greedy settings.
        Stop token ids are padded with -1 to a bucketed width (at least `MIN_STOP_IDS`)."""
        rows = len(self.rows)
        most = max((len(s.request.work.stop_token_ids) for s in self.rows if s is not None), default=0)
        busy, stop = np.zeros(rows, bool), np.full((rows, bucket(most, minimum=MIN_STOP_IDS)), -1, np.int32)
        temperature, top_p = np.zeros(rows, np.float32), np.ones(rows, np.float32)
        top_k, index, generated, position, slot, limit = (np.zeros(rows, np.int32) for _ in range(6))
        top_k[:] = 1
        for r, sample in enumerate(self.rows):
            if sample is None:
                continue
            request, work, n = sample.request, sample.request.work, len(sample.tokens)
            busy[r], temperature[r], top_p[r], top_k[r] = True, work.temperature, work.top_p, request.top_k
            index[r], generated[r], position[r] = sample.index, n, request.prompt_length + n - 1
            slot[r], limit[r] = request.slot, request.limit
            stop[r, : len(work.stop_token_ids)] = work.stop_token_ids
        a = jnp.asarray
        return DecodeRows(
            busy=a(busy),
            temperature=a(temperature),
            top_k=a(top_k),
            top_p=a(top_p),
            keys=self.keys,
            sample_index=a(index),
            generated=a(generated),
            position=a(position),
            slot=a(slot),
            limit=a(limit),
            stop=a(stop),
            wanted=a(np.int32(wanted)),
        )


def _admissible(waiting: deque[_Request], free: int) -> list[_Request]:
    """The longest prefix of `waiting` (taken off it) whose samples fit in `free` rows."""
    taken: list[_Request] = []
    while waiting and waiting[0].work.num_samples <= free - sum(r.work.num_samples for r in taken):
        taken.append(waiting.popleft())
    return taken


def _requests(
    spec: ModelSpec, items: Sequence[tuple[SampleWork, int]], tokenizer: Callable[[], Tokenizer]
) -> list[_Request]:
    """A `_Request` per (work, slot) of `items`; the tokenizer is loaded (once) at the first
    stop-string check."""
    loaded = functools.cache(tokenizer)
    requests = [
        _Request(
            index,
            work,
            slot,
            limit=min(work.max_tokens, spec.max_seq_len - len(work.prompt)),
            top_k=spec.vocab_size if work.top_k == -1 else min(work.top_k, spec.vocab_size),
        )
        for index, (work, slot) in enumerate(items)
    ]
    for request in requests:
        if request.work.stop_strings:
            request.stop_strings = StopStrings(request.work.stop_strings, lambda ids: loaded().decode(ids))
    return requests


def _pool(
    spec: ModelSpec,
    base: dict[str, jax.Array],
    lora: dict[str, jax.Array],
    dtype: jnp.dtype,
    requests: list[_Request],
    max_rows: int,
) -> DecodePool:
    """The pool for `requests`: rows for all their samples (bucketed, at most `max_rows`
    unless one request needs more) and a cache long enough for the longest."""
    needs = [r.work.num_samples for r in requests]
    rows = bucket(max(max(needs), min(sum(needs), max_rows)))
    longest = max(r.prompt_length + r.limit for r in requests)
    return DecodePool(spec, base, lora, dtype, rows, bucket(longest, minimum=MIN_PROMPT, cap=spec.max_seq_len))


def sample(
    spec: ModelSpec,
    base: dict[str, jax.Array],
    lora: dict[str, jax.Array],
    items: Sequence[tuple[SampleWork, int]],
    tokenizer: Callable[[], Tokenizer],
    dtype: jnp.dtype,
    on_result: Callable[[int, SampleOutput], None] | None = None,
    max_rows: int = MAX_ROWS,
) -> list[SampleOutput]:
    """S1–S3 for every (work, adapter slot) of `items`; results in item order, and each also
    passed to `on_result(index, output)` as soon as it is complete.

    Sample j of a work item with a seed draws its s-th token with `key(seed)` folded with j,
    then s. `tokenizer` is called (once) only when a stop string must be checked; `dtype` is
    the KV cache's. Returned tokens are int64 [N], logprobs float32 [N] and `prompt_logprobs`
    float32 [T] (NaN at 0) when requested. Pure apart from `on_result`.
    """
    requests = _requests(spec, items, tokenizer)
    pool = _pool(spec, base, lora, dtype, requests, max_rows)
    outputs: dict[int, SampleOutput] = {}
    waiting = deque(requests)
    while True:
        pool.admit(_admissible(waiting, len(pool.free())))
        if not pool.busy:
            break
        wanted = waiting[0].work.num_samples if waiting else len(pool.rows)  # the first waiting did not fit
        for request in pool.run(wanted):
            outputs[request.index] = request.output()
            if on_result is not None:
                on_result(request.index, outputs[request.index])
    return [outputs[r.index] for r in requests]  # every request is admitted, and a row stops by its limit
