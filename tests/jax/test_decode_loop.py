"""The on-device decode loop (compiled.decode through sampler.sample) on bios/tiny: the same
tokens and logprobs, bit for bit, as choosing and feeding one token per compiled call; greedy
equal to the emulator past a chunk boundary; stop token ids, stop strings (completed inside a
chunk and across two) and max_tokens honoured exactly as S3 defines them; one host round trip
per chunk; and stop strings checked by decoding O(tokens) tokens in all."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from backends.jax import compiled, params, sampler
from backends.jax.sampler import CHUNK, sample
from bios.backend import SampleWork
from bios.catalog import Catalog
from bios.weights import generate_base_weights
from emulator.model import forward

pytestmark = pytest.mark.slow

SPEC = Catalog().get("bios/tiny")
PROMPT = np.array([7, 3, 11, 3, 20, 1, 0, 9, 42, 100, 2000, 5])
LONG = CHUNK + 8
"""Tokens of the longer runs: they cross one chunk boundary."""


@pytest.fixture(scope="module")
def model():
    """(base, lora) as JAX arrays, slot 1 a random adapter of scale 2, and the float64 HF weights."""
    hf = generate_base_weights(SPEC)
    base = {k: jnp.asarray(v) for k, v in params.base_from_hf(SPEC, hf).items()}
    rng = np.random.default_rng(0)
    lora = {k: np.zeros(s, np.float32) for k, s in params.lora_shapes(SPEC, slots=2, rank=4).items()}
    for name, array in lora.items():
        if name != "scale":
            one = array[params.slot_index(name, 1)]
            one[...] = 0.3 * rng.standard_normal(one.shape)
    lora["scale"][:] = [0.0, 2.0]
    return base, {k: jnp.asarray(v) for k, v in lora.items()}, {k: v.astype(np.float64) for k, v in hf.items()}


class CountingTokenizer:
    """bios/tiny's tokenizer, counting the tokens it is asked to decode."""

    def __init__(self) -> None:
        self.tokenizer, self.decoded = SPEC.tokenizer(), 0

    def decode(self, tokens) -> str:
        self.decoded += len(tokens)
        return self.tokenizer.decode(tokens)


def work(**overrides) -> SampleWork:
    fields = dict(
        adapter_id=None,
        base_model=SPEC.name,
        prompt=PROMPT,
        num_samples=1,
        max_tokens=LONG,
        temperature=0.0,
        top_k=-1,
        top_p=1.0,
        seed=0,
        stop_token_ids=(),
        stop_strings=(),
    )
    return SampleWork(**{**fields, **overrides})


def run(model, *items, tokenizer=None):
    base, lora, _ = model
    return sample(SPEC, base, lora, list(items), lambda: tokenizer or CountingTokenizer(), jnp.float32)


def stepwise(model, items) -> list[list[tuple[list[int], list[float]]]]:
    """Every item's samples as (tokens, logprobs), decoded one compiled `choose` and one
    compiled `extend` per token over the pool `sample` builds (all items fit in it at once;
    S3 by stop token ids and limits only)."""
    base, lora, _ = model
    requests = sampler._requests(SPEC, items, CountingTokenizer)
    pool = sampler._pool(SPEC, base, lora, jnp.float32, requests, sampler.MAX_ROWS)
    pool.admit(requests)
    rows = list(pool.rows)
    live = [row is not None for row in rows]
    size = len(rows)
    logits, cache = pool.logits, pool.cache
    while any(live):
        temperature, top_p = np.zeros(size, np.float32), np.ones(size, np.float32)
        top_k, index, step = np.ones(size, np.int32), np.zeros(size, np.int32), np.zeros(size, np.int32)
        for r, row in enumerate(rows):
            if live[r]:
                temperature[r], top_k[r], top_p[r] = (
                    row.request.work.temperature,
                    row.request.top_k,
                    row.request.work.top_p,
                )
                index[r], step[r] = row.index, len(row.tokens)
        chosen, chosen_lp = compiled.choose(logits, temperature, top_k, top_p, pool.keys, index, step)
        chosen, chosen_lp = compiled.host(chosen), compiled.host(chosen_lp)
        fed, start, slot = (np.zeros(size, np.int32) for _ in range(3))
        for r, row in enumerate(rows):
            if live[r]:
                row.tokens.append(int(chosen[r]))
                row.logprobs.append(float(chosen_lp[r]))
                stopped = row.tokens[-1] in row.request.work.stop_token_ids or len(row.tokens) >= row.request.limit
                live[r] = not stopped
                if live[r]:
                    fed[r], start[r] = chosen[r], row.request.prompt_length + len(row.tokens) - 1
                    slot[r] = row.request.slot
        if any(live):
            step_logits, cache = compiled.extend(SPEC, base, lora, fed[:, None], start, cache, slot)
            logits = step_logits[:, 0]
    out: list[list[tuple[list[int], list[float]]]] = [[] for _ in items]
    for row in sorted((row for row in rows if row is not None), key=lambda row: row.index):
        out[row.request.index].append((row.tokens, row.logprobs))
    return out


def greedy_reference(model, slot: int, n: int) -> list[int]:
    """The emulator's greedy completion of PROMPT (bare base model)."""
    assert slot == 0
    _, _, hf = model
    tokens = list(PROMPT)
    for _ in range(n):
        tokens.append(int(np.argmax(forward(SPEC, hf, None, np.array(tokens))[0][-1])))
    return tokens[len(PROMPT) :]


@pytest.fixture(scope="module")
def free_run(model) -> list[int]:
    """The greedy completion of PROMPT, LONG tokens, no stops."""
    (out,) = run(model, (work(), 0))
    return out.sequences[0].tokens.tolist()


def test_chunks_equal_one_token_per_call_bit_for_bit(model):
    items = [
        (work(num_samples=3, temperature=1.0, seed=7), 1),
        (work(prompt=PROMPT[:5], temperature=0.7, top_k=50, top_p=0.9, seed=2**40 + 3), 0),
        (work(num_samples=2, temperature=1.3, max_tokens=11, seed=5), 1),
        (work(max_tokens=20, temperature=1.0, seed=1, stop_token_ids=(17, 4095)), 0),
    ]
    expected = stepwise(model, items)
    got = run(model, *items)
    for want, out in zip(expected, got, strict=True):
        for (tokens, logprobs), sequence in zip(want, out.sequences, strict=True):
            assert sequence.tokens.tolist() == tokens
            assert sequence.logprobs.dtype == np.float32
            assert np.array_equal(sequence.logprobs, np.asarray(logprobs, np.float32))
    assert [len(s.tokens) for s in got[0].sequences] == [LONG] * 3  # crosses a chunk boundary


def test_greedy_equals_the_emulator_across_chunks(model, free_run):
    assert free_run == greedy_reference(model, 0, LONG)


def test_stop_token_ids_and_max_tokens_are_exact(model, free_run):
    at = next(i for i in range(CHUNK + 1, LONG) if free_run[i] not in free_run[:i])  # in the second chunk
    unseen = [t for t in range(SPEC.vocab_size) if t not in free_run][:4]
    (out,) = run(model, (work(stop_token_ids=(*unseen, free_run[at])), 0))  # more ids than the smallest bucket
    assert out.sequences[0].tokens.tolist() == free_run[: at + 1] and out.sequences[0].stop_reason == "stop"
    for n in (1, 4, CHUNK, CHUNK + 1):
        (out,) = run(model, (work(max_tokens=n), 0))
        assert out.sequences[0].tokens.tolist() == free_run[:n] and out.sequences[0].stop_reason == "length"


def full_decode_stop(tokens: list[int], stop: str) -> int:
    """S3 as the emulator reads it: the first n with `stop` in the decoded tokens[: n + 1]."""
    tokenizer = SPEC.tokenizer()
    return next(n for n in range(len(tokens)) if stop in tokenizer.decode(tokens[: n + 1]))


@pytest.mark.parametrize("end", [9, CHUNK], ids=["inside-a-chunk", "across-two-chunks"])
def test_stop_strings_stop_at_the_completing_token(model, free_run, end):
    decode = SPEC.tokenizer().decode
    before, through = decode(free_run[:end]), decode(free_run[: end + 1])
    stop = through[len(before) - 2 :]  # the last two characters of tokens[:end], then token end's text
    assert full_decode_stop(free_run, stop) == end
    (out,) = run(model, (work(stop_strings=("never seen", stop)), 0))
    assert out.sequences[0].tokens.tolist() == free_run[: end + 1] and out.sequences[0].stop_reason == "stop"
    assert out.sequences[0].logprobs.shape == (end + 1,)


def test_waiting_requests_are_admitted_while_a_long_one_runs(model, free_run):
    """Through 2 rows: the long request keeps its row while short ones come and go beside it,
    each reported as soon as it completes, and each equals its run alone."""
    base, lora, _ = model
    items = [(work(), 0), (work(max_tokens=3, temperature=1.0, seed=4), 1), (work(max_tokens=5, seed=0), 1)]
    reported: list[int] = []
    pooled = sample(
        SPEC, base, lora, items, CountingTokenizer, jnp.float32, lambda i, _: reported.append(i), max_rows=2
    )
    assert reported == [1, 2, 0]
    assert pooled[0].sequences[0].tokens.tolist() == free_run
    for item, got in zip(items[1:], pooled[1:], strict=True):
        (alone,) = run(model, item)
        assert got.sequences[0].tokens.tolist() == alone.sequences[0].tokens.tolist()


def test_one_host_round_trip_per_chunk_and_linear_stop_string_decoding(model, monkeypatch):
    fetched = []
    real = compiled.host_all
    monkeypatch.setattr(compiled, "host_all", lambda *arrays: fetched.append(len(arrays)) or real(*arrays))
    tokenizer = CountingTokenizer()
    n = 3 * CHUNK + 5
    stop = "\u2603 never"  # 9 UTF-8 bytes: each new token decodes at most 10
    (out,) = run(model, (work(max_tokens=n, stop_strings=(stop,)), 0), tokenizer=tokenizer)
    assert len(out.sequences[0].tokens) == n
    assert len(fetched) == -(-n // CHUNK)  # one transfer per chunk (prompt logprobs not asked)
    assert tokenizer.decoded == sum(min(i + 1, 10) for i in range(n))  # O(n), not n (n + 1) / 2


def test_a_decode_chunk_updates_the_cache_in_place(model):
    """The compiled decode loop writes each step's keys and values into the donated cache where
    it lies: no copy of a whole cache anywhere in the program (a per-step copy would move the
    whole cache through memory at every token)."""
    base, lora, _ = model
    requests = sampler._requests(SPEC, [(work(num_samples=2, temperature=1.0), 1)], CountingTokenizer)
    pool = sampler._pool(SPEC, base, lora, jnp.float32, requests, sampler.MAX_ROWS)
    rows = pool._settings(len(pool.rows))
    program = compiled.decode.lower(SPEC, base, lora, pool.logits, pool.cache, rows, CHUNK).compile().as_text()
    cache_shape = "f32[" + ",".join(map(str, pool.cache[0].shape)) + "]"
    copied = [
        line for line in program.splitlines() if cache_shape in line and (" copy(" in line or "broadcast(" in line)
    ]
    assert not copied, copied[:3]
