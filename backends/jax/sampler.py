"""Sampling of docs/losses.md S1–S3 on the JAX backend: a batched prefill, then one token per step.

All rows of a call decode together. Each item's prompt is prefilled once (one row per item),
its KV cache rows are copied to the item's `num_samples` sample rows, and every step feeds
the last chosen token of every row through `compiled.extend`. The choice of the next token
(S1) and its logprob (S2) run on device in `choose`; stops (S3) are checked on the host.
Rows are ordered by adapter slot (stable) so their `token_slot` is sorted; row counts and
lengths are bucketed so few programs compile.

Shapes: B rows, T tokens, V vocab, C cache capacity, L layers, K kv heads, E head dim.
"""

from __future__ import annotations

import functools
import secrets
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from backends.jax import compiled
from bios.backend import SampledOutput, SampleOutput, SampleWork
from bios.catalog import ModelSpec
from bios.tokenizer import Tokenizer

MIN_PROMPT = 16
"""Smallest prompt-length bucket of the prefill."""


@jax.jit
def choose(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           keys: jax.Array, index: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """S1 and S2 for every row: the next token [B] int32 and `log_softmax(logits)[token]` [B] float32.

    logits [B, V]: raw (temperature 1). temperature, top_p [B] float32 (temperature 0 takes
    the argmax, lowest id on ties); top_k [B] int32 in 1..V (V keeps all). A row draws with its
    item's key [B] folded with its sample index [B] and then with `step` (a scalar).
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
    row_keys = jax.vmap(lambda key, j: jax.random.fold_in(jax.random.fold_in(key, j), step))(keys, index)
    pick = jax.vmap(jax.random.categorical)(row_keys, jnp.where(kept, sorted_z, -jnp.inf))
    drawn = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]
    token = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logprob


def _item_key(seed: int | None) -> jax.Array:
    """`jax.random.key` of the seed's low 32 bits, folded with each higher 32-bit word so that
    seeds of any size stay distinct; seed None draws 64 bits of fresh entropy."""
    seed = secrets.randbits(64) if seed is None else seed
    key = jax.random.key(seed & 0xFFFFFFFF)
    for shift in range(32, seed.bit_length(), 32):
        key = jax.random.fold_in(key, (seed >> shift) & 0xFFFFFFFF)
    return key


def _pad(values: np.ndarray, rows: int) -> np.ndarray:
    """values [n, ...] padded to [rows, ...] by repeating the last entry (keeps slots sorted)."""
    return np.pad(values, [(0, rows - len(values))] + [(0, 0)] * (values.ndim - 1), mode="edge")


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


def sample(spec: ModelSpec, base: dict[str, jax.Array], lora: dict[str, jax.Array], items: Sequence[tuple[SampleWork, int]],
           tokenizer: Callable[[], Tokenizer], dtype: jnp.dtype) -> list[SampleOutput]:
    """S1–S3 for every (work, adapter slot) of `items`, decoded as one batch; results in item order.

    Sample j of a work item with a seed draws step s with `key(seed)` folded with j, then s.
    `tokenizer` is called (once) only when a stop string must be checked; `dtype` is the KV
    cache's. Returned tokens are int64 [N], logprobs float32 [N] and
    `prompt_logprobs` float32 [T] (NaN at 0) when requested.
    """
    order = sorted(range(len(items)), key=lambda i: items[i][1])
    works = [items[i][0] for i in order]
    slots = np.array([items[i][1] for i in order], np.int32)
    lengths = np.array([len(w.prompt) for w in works])
    limits = np.minimum([w.max_tokens for w in works], spec.max_seq_len - lengths)  # tokens each row may generate
    loaded = functools.cache(tokenizer)

    def decode(ids: list[int]) -> str:
        return loaded().decode(ids)

    # Prefill: one row per item, prompts right-padded to T.
    width = compiled.bucket(int(lengths.max()), minimum=MIN_PROMPT, cap=spec.max_seq_len)
    capacity = compiled.bucket(int((lengths + limits).max()), minimum=width, cap=spec.max_seq_len)
    prompts = np.zeros((len(works), width), np.int32)
    for i, w in enumerate(works):
        prompts[i, : lengths[i]] = w.prompt
    prompts = _pad(prompts, compiled.bucket(len(works)))
    shape = (spec.n_layers, len(prompts), capacity, spec.n_kv_heads, spec.head_dim)
    logits, cache = compiled.extend(spec, base, lora, prompts, np.zeros(len(prompts), np.int32),
                                    (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), np.repeat(_pad(slots, len(prompts)), width))
    first = logits[jnp.arange(len(prompts)), jnp.asarray(_pad(lengths, len(prompts)) - 1)]  # [P, V]
    prompt_lp = _prompt_logprobs(logits, prompts) if any(w.prompt_logprobs for w in works) else None
    del logits

    # Sample rows: each item's rows copy its prefill row; B is bucketed.
    item_of_row = np.repeat(np.arange(len(works)), [w.num_samples for w in works])
    n_rows = len(item_of_row)
    source = _pad(item_of_row, compiled.bucket(n_rows))
    cache = tuple(c[:, source] for c in cache)
    z = first[source]
    temperature = np.array([w.temperature for w in works], np.float32)[source]
    top_k = np.array([spec.vocab_size if w.top_k == -1 else min(w.top_k, spec.vocab_size) for w in works], np.int32)[source]
    top_p = np.array([w.top_p for w in works], np.float32)[source]
    keys = jnp.stack([_item_key(w.seed) for w in works])[source]
    index = _pad(np.concatenate([np.arange(w.num_samples) for w in works]), len(source)).astype(np.int32)
    row_slot = slots[source]

    tokens: list[list[int]] = [[] for _ in range(n_rows)]
    logprobs: list[list[float]] = [[] for _ in range(n_rows)]
    reasons: list[str | None] = [None] * n_rows
    step = 0
    while True:
        chosen, chosen_lp = choose(z, temperature, top_k, top_p, keys, index, np.int32(step))
        host_tokens, host_lp = compiled.host(chosen), compiled.host(chosen_lp)
        for r in range(n_rows):
            if reasons[r] is None:
                i = item_of_row[r]
                tokens[r].append(int(host_tokens[r]))
                logprobs[r].append(float(host_lp[r]))
                reasons[r] = _stop_reason(works[i], tokens[r], int(limits[i]), decode)
        if all(reasons):
            break
        start = np.minimum(lengths[source] + step, capacity - 1).astype(np.int32)  # finished rows stay in range
        logits, cache = compiled.extend(spec, base, lora, chosen[:, None], start, cache, row_slot)
        z = logits[:, 0]
        step += 1

    outputs: list[SampleOutput | None] = [None] * len(items)
    for i, w in enumerate(works):
        rows = np.flatnonzero(item_of_row == i)
        sequences = tuple(SampledOutput(np.asarray(tokens[r], np.int64), np.asarray(logprobs[r], np.float32), reasons[r])
                          for r in rows)  # fmt: skip
        lp = None
        if w.prompt_logprobs:
            lp = np.concatenate([[np.nan], prompt_lp[i, : lengths[i] - 1]]).astype(np.float32)
        outputs[order[i]] = SampleOutput(sequences, lp)
    return outputs
