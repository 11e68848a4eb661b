"""Sampling of docs/losses.md S1–S3 on the JAX backend, continuously batched.

A fixed pool of decode rows shares one KV cache. Waiting requests are admitted (first come,
first served) whenever enough rows are free: their prompts are prefilled together, once per
request, and the prefilled cache row is copied into each of the request's `num_samples` rows.
Every step then feeds the last token of every row through `compiled.extend`, chooses the next
tokens on device (`compiled.choose`: S1, S2) and checks stops on the host (S3). A request whose rows
have all stopped is reported at once (`on_result`) and its rows go to the next waiting one.
Rows may serve different adapters in any order. Row counts and lengths are bucketed so few
programs compile.

Shapes: B rows, T tokens, V vocab, C cache capacity, L layers, K kv heads, E head dim.
"""

from __future__ import annotations

import functools
import secrets
from collections import deque
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from backends.jax import compiled
from backends.jax.batch import bucket
from bios.backend import SampledOutput, SampleOutput, SampleWork
from bios.catalog import ModelSpec
from bios.tokenizer import Tokenizer

MIN_PROMPT = 16
"""Smallest prompt-length bucket of the prefill."""
MAX_ROWS = 64
"""Decode rows of the pool at most (more requests wait for free rows)."""


def _item_key(seed: int | None) -> jax.Array:
    """`jax.random.key` of the seed's low 32 bits, folded with each higher 32-bit word so that
    seeds of any size stay distinct; seed None draws 64 bits of fresh entropy."""
    seed = secrets.randbits(64) if seed is None else seed
    key = jax.random.key(seed & 0xFFFFFFFF)
    for shift in range(32, seed.bit_length(), 32):
        key = jax.random.fold_in(key, (seed >> shift) & 0xFFFFFFFF)
    return key


def _stop_reason(work: SampleWork, generated: list[int], limit: int, decode: Callable[[list[int]], str]) -> str | None:
    """S3 after the latest token: "stop", "length" (at `limit` tokens), or None to go on."""
    if generated[-1] in work.stop_token_ids:
        return "stop"
    if work.stop_strings and any(s in decode(generated) for s in work.stop_strings):
        return "stop"
    return "length" if len(generated) >= limit else None


def _prompt_logprobs(logits: jax.Array, prompts: np.ndarray) -> np.ndarray:
    """[P, T] with entry t = log p(prompt[t] | prompt[:t]) (t >= 1) from prefill logits [P, T, V]."""
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return compiled.host(jnp.take_along_axis(lp, jnp.asarray(prompts[:, 1:, None]), axis=-1)[..., 0])


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
    float32 [T] (NaN at 0) when requested.
    """
    works = [w for w, _ in items]
    lengths = np.array([len(w.prompt) for w in works])
    limits = np.minimum([w.max_tokens for w in works], spec.max_seq_len - lengths)  # tokens each row may generate
    needs = [w.num_samples for w in works]
    loaded = functools.cache(tokenizer)
    rows = bucket(max(max(needs), min(sum(needs), max_rows)))
    capacity = bucket(int((lengths + limits).max()), minimum=MIN_PROMPT, cap=spec.max_seq_len)
    shape = (spec.n_layers, rows, capacity, spec.n_kv_heads, spec.head_dim)
    cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    z = jnp.zeros((rows, spec.vocab_size), jnp.float32)  # next-token logits of every row
    item_of = np.full(rows, -1)  # -1: a free row
    sample_of, slot_of, position, step = (np.zeros(rows, np.int32) for _ in range(4))
    temperature, top_p, top_k = np.zeros(rows, np.float32), np.ones(rows, np.float32), np.ones(rows, np.int32)
    keys = jnp.stack([_item_key(0)] * rows)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    finished: dict[int, list[tuple[list[int], list[float], str, int]]] = {i: [] for i in range(len(works))}
    prompt_lp: dict[int, np.ndarray] = {}
    outputs: list[SampleOutput | None] = [None] * len(works)
    waiting = deque(range(len(works)))

    def admit() -> None:
        """Prefill the waiting items that fit in the free rows and start their rows."""
        nonlocal cache, z, keys
        free = list(np.flatnonzero(item_of < 0))
        admitted = []
        while waiting and needs[waiting[0]] <= len(free) - sum(needs[i] for i in admitted):
            admitted.append(waiting.popleft())
        if not admitted:
            return
        width = bucket(int(lengths[admitted].max()), minimum=MIN_PROMPT, cap=capacity)
        count = bucket(len(admitted))
        prompts = np.zeros((count, width), np.int32)
        slots = np.zeros(count, np.int32)
        for p, i in enumerate(admitted):
            prompts[p, : lengths[i]], slots[p] = works[i].prompt, items[i][1]
        fresh = tuple(
            jnp.zeros((spec.n_layers, count, capacity, spec.n_kv_heads, spec.head_dim), dtype) for _ in range(2)
        )
        logits, fresh = compiled.extend(
            spec, base, lora, prompts, np.zeros(count, np.int32), fresh, np.repeat(slots, width)
        )
        to, source = [], []
        for p, i in enumerate(admitted):
            if works[i].prompt_logprobs:
                prompt_lp[i] = _prompt_logprobs(logits[p : p + 1, : lengths[i]], prompts[p : p + 1, : lengths[i]])[0]
            for j in range(needs[i]):
                r = free.pop(0)
                to.append(r)
                source.append(p)
                item_of[r], sample_of[r], slot_of[r], position[r], step[r] = i, j, items[i][1], lengths[i], 0
                temperature[r], top_p[r] = works[i].temperature, works[i].top_p
                top_k[r] = spec.vocab_size if works[i].top_k == -1 else min(works[i].top_k, spec.vocab_size)
                tokens[r], logprobs[r] = [], []
        padded = bucket(len(to))
        to_rows = np.array(to + [to[-1]] * (padded - len(to)), np.int32)
        from_rows = np.array(source + [source[-1]] * (padded - len(source)), np.int32)
        cache = compiled.copy_rows(cache, fresh, to_rows, from_rows)
        z = z.at[to_rows].set(logits[from_rows, lengths[[admitted[p] for p in from_rows]] - 1])
        keys = keys.at[to_rows].set(jnp.stack([_item_key(works[admitted[p]].seed) for p in from_rows]))

    def record(chosen: np.ndarray, chosen_lp: np.ndarray) -> None:
        """Append each active row's token; finish rows (S3) and report completed items."""
        for r in np.flatnonzero(item_of >= 0):
            i = item_of[r]
            tokens[r].append(int(chosen[r]))
            logprobs[r].append(float(chosen_lp[r]))
            step[r] += 1
            reason = _stop_reason(works[i], tokens[r], int(limits[i]), lambda ids: loaded().decode(ids))
            if reason is None:
                continue
            finished[i].append((tokens[r], logprobs[r], reason, sample_of[r]))
            item_of[r] = -1
            if len(finished[i]) == needs[i]:
                sequences = tuple(
                    SampledOutput(np.asarray(t, np.int64), np.asarray(lp, np.float32), why)
                    for t, lp, why, _ in sorted(finished[i], key=lambda f: f[3])
                )
                lp = None if i not in prompt_lp else np.concatenate([[np.nan], prompt_lp[i]]).astype(np.float32)
                outputs[i] = SampleOutput(sequences, lp)
                if on_result is not None:
                    on_result(i, outputs[i])

    while True:
        admit()
        if not (item_of >= 0).any():
            break
        chosen, chosen_lp = compiled.choose(z, temperature, top_k, top_p, keys, sample_of, step)
        record(compiled.host(chosen), compiled.host(chosen_lp))
        active = item_of >= 0
        if not active.any() and not waiting:
            break
        fed = np.where(active, compiled.host(chosen), 0).astype(np.int32)[:, None]
        start = np.where(active, np.minimum(position + step - 1, capacity - 1), 0).astype(np.int32)
        logits, cache = compiled.extend(
            spec, base, lora, fed, start, cache, np.where(active, slot_of, 0).astype(np.int32)
        )
        z = logits[:, 0]
    return outputs  # type: ignore[return-value]
