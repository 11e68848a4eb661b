"""backends.jax.sampler against the NumPy reference (docs/losses.md S1–S3), on a tiny model:
greedy decoding and reported logprobs, seeds, top-k / top-p kept sets (also with ties),
stop tokens and strings, both length limits, mixed batches and prompt logprobs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.jax import compiled, params
from backends.jax.compiled import choose
from backends.jax.sampler import sample
from bios.backend import SampleWork
from bios.catalog import ModelSpec
from bios.weights import generate_base_weights
from emulator.model import Lora, forward, token_logprobs, top_logprobs
from emulator.sampler import kept_set

SPEC = ModelSpec(
    name="test/tiny-jax",
    vocab_size=64,
    d_model=16,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    head_dim=8,
    d_ff=32,
    max_seq_len=32,
    weights_seed=5,
)
PROMPT = np.array([7, 3, 11, 3, 20, 1, 0, 9, 42])
RANK = 4
LP_RTOL = 1e-4


class LetterTokenizer:
    """Token t decodes to the single character chr(65 + t)."""

    def decode(self, tokens) -> str:
        return "".join(chr(65 + int(t)) for t in tokens)


@pytest.fixture(scope="module")
def programs_before() -> tuple[int, int]:
    """(extend, decode) programs compiled before this module's first test (other modules share the cache)."""
    counts = compiled.compile_counts()
    return counts["extend"], counts["decode"]


@pytest.fixture(scope="module")
def model(programs_before):
    """(base, lora) as JAX arrays (slot 1: a random adapter of scale 2; slot 2: zeros of scale 1),
    and the emulator's float64 weights and `Lora` per slot (None for the bare base)."""
    hf = generate_base_weights(SPEC)
    base = {k: jnp.asarray(v) for k, v in params.base_from_hf(SPEC, hf).items()}
    rng = np.random.default_rng(0)
    lora = {k: np.zeros(s, np.float32) for k, s in params.lora_shapes(SPEC, slots=3, rank=RANK).items()}
    for name, array in lora.items():
        if name != "scale":
            one = array[params.slot_index(name, 1)]
            one[...] = 0.3 * rng.standard_normal(one.shape)
    lora["scale"][:] = [0.0, 2.0, 1.0]
    slot1 = {k: v[params.slot_index(k, 1)] for k, v in lora.items() if k != "scale"}
    weights = params.adapter_weights(SPEC, slot1, tuple(SPEC.linear_shapes()), RANK)
    reference = {k: v.astype(np.float64) for k, v in hf.items()}
    adapters = {0: None, 1: Lora({k: v.astype(np.float64) for k, v in weights.items()}, 2.0), 2: None}
    return base, {k: jnp.asarray(v) for k, v in lora.items()}, reference, adapters


def work(**overrides) -> SampleWork:
    fields = dict(
        adapter_id=None,
        base_model=SPEC.name,
        prompt=PROMPT,
        num_samples=1,
        max_tokens=8,
        temperature=0.0,
        top_k=-1,
        top_p=1.0,
        seed=0,
        stop_token_ids=(),
        stop_strings=(),
    )
    return SampleWork(**{**fields, **overrides})


def run(model, *items):
    """sample() over (work, slot) pairs with the letter tokenizer."""
    base, lora, _, _ = model
    return sample(SPEC, base, lora, list(items), LetterTokenizer, jnp.float32)


def reference_logits(model, slot: int, tokens: np.ndarray) -> np.ndarray:
    """The emulator's logits [T, V] of `tokens` under `slot`."""
    _, _, reference, adapters = model
    return forward(SPEC, reference, adapters[slot], np.asarray(tokens))[0]


def reference_greedy(model, slot: int, n: int) -> list[int]:
    tokens = list(PROMPT)
    for _ in range(n):
        tokens.append(int(np.argmax(reference_logits(model, slot, np.array(tokens))[-1])))
    return tokens[len(PROMPT) :]


def check_logprobs(model, slot: int, sequence) -> None:
    """S2: each reported logprob is the reference forward's logprob of that token."""
    full = np.concatenate([PROMPT, sequence.tokens])
    expected = token_logprobs(reference_logits(model, slot, full)[len(PROMPT) - 1 : -1], sequence.tokens)
    np.testing.assert_allclose(sequence.logprobs, expected, rtol=LP_RTOL)


@pytest.mark.parametrize("slot", [0, 1])
def test_greedy_matches_the_reference(model, slot):
    (out,) = run(model, (work(max_tokens=10), slot))
    (sequence,) = out.sequences
    assert sequence.tokens.dtype == np.int64 and sequence.stop_reason == "length"
    assert sequence.tokens.tolist() == reference_greedy(model, slot, 10)
    check_logprobs(model, slot, sequence)


def test_sampled_logprobs_are_raw_model_logprobs(model):
    (out,) = run(model, (work(num_samples=4, temperature=1.7, top_k=20, top_p=0.9, max_tokens=10, seed=3), 1))
    for sequence in out.sequences:
        check_logprobs(model, 1, sequence)


def test_seeds(model):
    item = work(num_samples=4, temperature=1.5, max_tokens=10, seed=11)
    first, again = run(model, (item, 1)), run(model, (item, 1))
    tokens = [s.tokens.tolist() for s in first[0].sequences]
    assert tokens == [s.tokens.tolist() for s in again[0].sequences]
    assert len({tuple(t) for t in tokens}) == 4  # sample indices draw different streams
    (other,) = run(model, (work(num_samples=4, temperature=1.5, max_tokens=10, seed=12), 1))
    assert tokens != [s.tokens.tolist() for s in other.sequences]
    (fresh,) = run(model, (work(num_samples=4, temperature=1.5, max_tokens=10, seed=None), 1))
    assert all(len(s.tokens) == 10 for s in fresh.sequences)
    (big,) = run(model, (work(num_samples=4, temperature=1.5, max_tokens=10, seed=11 + 2**40), 1))
    assert tokens != [s.tokens.tolist() for s in big.sequences]  # high seed bits are not dropped


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (-1, 0.3)])
def test_every_draw_is_in_the_reference_kept_set(model, top_k, top_p):
    temperature = 2.0
    (out,) = run(
        model, (work(num_samples=8, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=16, seed=5), 1)
    )
    seen = set()
    for sequence in out.sequences:
        full = np.concatenate([PROMPT, sequence.tokens])
        logits = reference_logits(model, 1, full)[len(PROMPT) - 1 : -1]
        for z, token in zip(logits, sequence.tokens, strict=True):
            assert token in kept_set(z / temperature, top_k, top_p)[0]
        seen.add(int(sequence.tokens[0]))
    assert len(seen) > 1  # not greedy in disguise


def test_choose_breaks_ties_by_lower_id():
    logits = jnp.tile(jnp.array([0.0, 5.0, 5.0, 5.0, 1.0, 5.0]), (8, 1))
    rows = np.ones(8, np.float32)
    keys = jnp.stack([jax.random.key(0)] * 8)

    def draw(temperature, top_k, top_p):
        """The set of tokens drawn by 8 rows over 16 steps."""
        seen = set()
        for step in range(16):
            tokens, lp = choose(
                logits,
                temperature * rows,
                (top_k * rows).astype(np.int32),
                top_p * rows,
                keys,
                np.arange(8, dtype=np.int32),
                np.full(8, step, np.int32),
            )
            np.testing.assert_allclose(lp, jax.nn.log_softmax(logits[0])[tokens], rtol=1e-6)
            seen |= set(np.asarray(tokens).tolist())
        return seen

    assert draw(0.0, 6, 1.0) == {1}
    assert draw(1.0, 2, 1.0) == {1, 2}
    assert draw(1.0, 6, 0.6) == {1, 2, 3}  # each of the four 5s holds ~0.25
    assert draw(1.0, 6, 1e-3) == {1}  # at least one token


def test_stop_token_and_stop_string(model):
    greedy = reference_greedy(model, 0, 12)
    stop_at = next(i for i in range(2, 12) if greedy[i] not in greedy[:i])
    (out,) = run(model, (work(max_tokens=12, stop_token_ids=(greedy[stop_at],)), 0))
    assert out.sequences[0].tokens.tolist() == greedy[: stop_at + 1] and out.sequences[0].stop_reason == "stop"

    text = LetterTokenizer().decode(greedy)
    needle = text[stop_at - 1 : stop_at + 1]  # spans two tokens
    end = next(n for n in range(1, 13) if needle in text[:n])
    (out,) = run(model, (work(max_tokens=12, stop_strings=("never", needle)), 0))
    assert out.sequences[0].tokens.tolist() == greedy[:end] and out.sequences[0].stop_reason == "stop"


def test_length_limits(model):
    (out,) = run(model, (work(max_tokens=13), 0))
    assert len(out.sequences[0].tokens) == 13 and out.sequences[0].stop_reason == "length"
    long_prompt = np.arange(28)
    (out,) = run(model, (work(prompt=long_prompt, max_tokens=10, num_samples=4, temperature=1.0), 1))
    assert [len(s.tokens) for s in out.sequences] == [4] * 4  # 28 + 4 = max_seq_len
    assert all(s.stop_reason == "length" for s in out.sequences)


def test_a_row_draws_the_same_whatever_its_neighbours_filter():
    """The vocabulary is sorted only when some row filters (top-k / top-p); an unfiltered row's
    draw is the same either way."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((2, 64)).astype(np.float32))
    keys = jnp.stack([jax.random.key(7), jax.random.key(8)])
    index = np.zeros(2, np.int32)
    temperature = np.ones(2, np.float32)

    def row_zero(top_k_1: int, top_p_1: float, step: int) -> int:
        top_k, top_p = np.array([64, top_k_1], np.int32), np.array([1.0, top_p_1], np.float32)
        tokens, _ = choose(logits, temperature, top_k, top_p, keys, index, np.full(2, step, np.int32))
        return int(tokens[0])

    alone = [row_zero(64, 1.0, step) for step in range(32)]
    assert [row_zero(3, 1.0, step) for step in range(32)] == alone
    assert [row_zero(64, 0.5, step) for step in range(32)] == alone
    assert len(set(alone)) > 8  # really sampled


def test_mixed_batch_equals_each_alone(model):
    short = np.array([5, 6, 7])
    items = [
        (work(max_tokens=12, num_samples=3), 1),
        (work(prompt=short, max_tokens=20, prompt_logprobs=True), 0),
        (work(max_tokens=8, num_samples=4, stop_token_ids=(1,)), 2),
    ]
    together = run(model, *items)
    for item, got in zip(items, together, strict=True):
        (alone,) = run(model, item)
        assert len(got.sequences) == item[0].num_samples
        for a, g in zip(alone.sequences, got.sequences, strict=True):
            assert g.tokens.tolist() == a.tokens.tolist() and g.stop_reason == a.stop_reason
            np.testing.assert_allclose(g.logprobs, a.logprobs, rtol=1e-5)
    assert together[0].prompt_logprobs is None and together[1].prompt_logprobs is not None


def test_continuous_batching_through_a_small_row_pool(model):
    """Five requests through a pool of 2 rows: requests wait for free rows, each is reported
    as soon as it completes (short ones first), and every result equals the request run alone."""
    base, lora, _, _ = model
    items = [
        (work(max_tokens=n, temperature=t, seed=s), slot)
        for n, t, s, slot in [(12, 0.0, 0, 1), (2, 1.0, 3, 0), (9, 0.7, 5, 2), (1, 0.0, 0, 1), (6, 1.3, 8, 0)]
    ]
    reported: list[int] = []
    pooled = sample(SPEC, base, lora, items, LetterTokenizer, jnp.float32, lambda i, _: reported.append(i), max_rows=2)
    # Rows go first come, first served: 0 and 1 start; 1 ends after 2 tokens and 2 takes its row;
    # 2 (9 tokens from step 2) ends before 0 (12 tokens); then 3 and 4 share the freed rows.
    assert reported == [1, 2, 0, 3, 4]
    for item, got in zip(items, pooled, strict=True):
        (alone,) = run(model, item)
        assert got.sequences[0].tokens.tolist() == alone.sequences[0].tokens.tolist()
        np.testing.assert_allclose(got.sequences[0].logprobs, alone.sequences[0].logprobs, rtol=1e-5)


def test_prompt_logprobs_match_the_reference(model):
    (out,) = run(model, (work(max_tokens=10, prompt_logprobs=True), 1))
    lp = out.prompt_logprobs
    assert lp.shape == PROMPT.shape and np.isnan(lp[0])
    expected = token_logprobs(reference_logits(model, 1, PROMPT)[:-1], PROMPT[1:])
    np.testing.assert_allclose(lp[1:], expected, rtol=LP_RTOL)


def test_topk_prompt_logprobs_match_the_reference(model):
    (out,) = run(model, (work(max_tokens=2, topk_prompt_logprobs=5), 1))
    ids, logprobs = out.topk_prompt
    assert ids.shape == logprobs.shape == (len(PROMPT) - 1, 5) and out.prompt_logprobs is None
    expected_ids, expected = top_logprobs(reference_logits(model, 1, PROMPT)[:-1], 5)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(logprobs, expected, rtol=LP_RTOL)


def test_few_programs(programs_before):
    extend_before, decode_before = programs_before
    counts = compiled.compile_counts()
    grown = counts["extend"] - extend_before, counts["decode"] - decode_before
    # extend prefills only; decode compiles once per (row bucket, cache length), never per length or chunk
    assert grown[0] <= 6 and grown[1] <= 6, grown
