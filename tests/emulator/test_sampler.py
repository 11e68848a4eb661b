"""Sampling S1–S3: the kept set, greedy decoding against the forward pass, seeds, reported
logprobs, stop tokens, stop strings (also across two tokens) and the two length limits."""

from __future__ import annotations

import numpy as np
import pytest

from bios.backend import AdapterSpec, AdapterState, BackendConfig, SampleWork
from bios.catalog import Catalog, ModelSpec
from bios.weights import lora_shapes
from emulator.backend import EmulatorBackend
from emulator.model import Lora, forward, token_logprobs
from emulator.sampler import kept_set, next_token

SPEC = ModelSpec(
    name="test/tiny",
    vocab_size=50,
    d_model=16,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=4,
    d_ff=24,
    architecture="qwen3",
    max_seq_len=12,
    weights_seed=4,
)
MODULES = ("q_proj", "v_proj", "down_proj", "lm_head")
PROMPT = np.array([7, 3, 11, 3, 20, 1, 0, 9])


class LetterTokenizer:
    """Token t decodes to the single character chr(65 + t); counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def decode(self, tokens) -> str:
        self.calls += 1
        return "".join(chr(65 + int(t)) for t in tokens)


@pytest.fixture()
def setup():
    """A backend with adapter "a" (B non-zero) on SPEC, its float64 weights and the fake tokenizer."""
    tokenizer = LetterTokenizer()
    backend = EmulatorBackend(BackendConfig(catalog=Catalog({SPEC.name: SPEC})), tokenizer_for=lambda spec: tokenizer)
    rng = np.random.default_rng(3)
    weights = {name: 0.5 * rng.standard_normal(shape) for name, shape in lora_shapes(SPEC, MODULES, 2).items()}
    spec = AdapterSpec("a", SPEC.name, rank=2, alpha=2.0, target_modules=MODULES)
    backend.create_adapter(spec, AdapterState(spec, 0, weights))
    base = {k: v.astype(np.float64) for k, v in backend.base_weights(SPEC.name).items()}
    return backend, Lora(weights, 1.0), base, tokenizer


def work(**overrides) -> SampleWork:
    fields = dict(
        adapter_id="a",
        base_model=SPEC.name,
        prompt=PROMPT,
        num_samples=1,
        max_tokens=4,
        temperature=0.0,
        top_k=-1,
        top_p=1.0,
        seed=0,
        stop_token_ids=(),
        stop_strings=(),
    )
    fields.update(overrides)
    return SampleWork(**fields)  # type: ignore[arg-type]


def run(backend, **overrides):
    out = backend.sample([work(**overrides)])[0]
    assert not isinstance(out, Exception), out
    return out


def test_kept_set_s1_by_hand():
    z = np.log(np.array([0.1, 0.35, 0.35, 0.2]))
    ids, probs = kept_set(z, -1, 0.6)  # 0.35 (id 1), 0.35 (id 2): 0.7 >= 0.6
    np.testing.assert_array_equal(ids, [1, 2])
    np.testing.assert_allclose(probs, [0.5, 0.5])
    ids, probs = kept_set(z, 3, 1.0)  # top-3 of the renormalised distribution
    np.testing.assert_array_equal(ids, [1, 2, 3])
    np.testing.assert_allclose(probs, [0.35 / 0.9, 0.35 / 0.9, 0.2 / 0.9])
    ids, _ = kept_set(z, 3, 0.8)  # top-p on the top-k renormalised mass: 0.389, 0.778, 1.0
    np.testing.assert_array_equal(ids, [1, 2, 3])
    ids, _ = kept_set(z, -1, 1e-9)  # at least one token, ties to the lower id
    np.testing.assert_array_equal(ids, [1])


def test_greedy_ties_take_the_lowest_index():
    assert next_token(np.array([0.0, 2.0, 2.0, 1.0]), 0.0, -1, 1.0, np.random.default_rng(0)) == 1


def test_draws_stay_in_the_kept_set():
    z = np.log(np.array([0.1, 0.35, 0.35, 0.2]))
    rng = np.random.default_rng(0)
    draws = {next_token(z, 1.0, 3, 0.7, rng) for _ in range(200)}
    assert draws == {1, 2}


def test_greedy_is_the_argmax_of_the_forward_logits_at_each_step(setup):
    backend, lora, base, _ = setup
    out = run(backend, max_tokens=4, prompt_logprobs=True).sequences[0]
    assert out.stop_reason == "length" and len(out.tokens) == 4
    full = np.concatenate([PROMPT, out.tokens])
    logits, _ = forward(SPEC, base, lora, full)
    np.testing.assert_array_equal(out.tokens, np.argmax(logits[len(PROMPT) - 1 : -1], axis=-1))
    lp = token_logprobs(logits[:-1], full[1:])
    np.testing.assert_allclose(out.logprobs, lp[len(PROMPT) - 1 :], rtol=1e-12)
    prompt_lp = run(backend, prompt_logprobs=True).prompt_logprobs
    assert np.isnan(prompt_lp[0])
    np.testing.assert_allclose(prompt_lp[1:], lp[: len(PROMPT) - 1], rtol=1e-12)


def test_top_k_one_and_tiny_top_p_are_greedy(setup):
    backend = setup[0]
    greedy = run(backend).sequences[0].tokens
    np.testing.assert_array_equal(run(backend, temperature=1.0, top_k=1).sequences[0].tokens, greedy)
    np.testing.assert_array_equal(run(backend, temperature=1.5, top_p=1e-9).sequences[0].tokens, greedy)


def test_seeded_samples_are_reproducible_and_in_the_kept_set(setup):
    backend, lora, base, _ = setup
    params = dict(temperature=0.7, top_k=8, top_p=0.9, num_samples=3, seed=5)
    first, again = run(backend, **params), run(backend, **params)
    for a, b in zip(first.sequences, again.sequences):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    assert len({tuple(s.tokens) for s in first.sequences}) > 1
    for seq in first.sequences:
        full = np.concatenate([PROMPT, seq.tokens])
        logits, _ = forward(SPEC, base, lora, full)
        for step, token in enumerate(seq.tokens):
            ids, _ = kept_set(logits[len(PROMPT) - 1 + step] / 0.7, 8, 0.9)
            assert token in ids
        np.testing.assert_allclose(seq.logprobs, token_logprobs(logits[:-1], full[1:])[len(PROMPT) - 1 :], rtol=1e-12)
    assert len(run(backend, **{**params, "seed": None}).sequences) == 3


def test_stop_token_id_ends_with_stop_and_keeps_it(setup):
    backend = setup[0]
    greedy = run(backend).sequences[0].tokens
    stop = int(greedy[2])
    end = list(greedy).index(stop) + 1
    out = run(backend, stop_token_ids=(stop, 49)).sequences[0]
    assert out.stop_reason == "stop"
    np.testing.assert_array_equal(out.tokens, greedy[:end])
    assert len(out.logprobs) == end


def test_stop_string_across_two_tokens(setup):
    backend, _, _, tokenizer = setup
    greedy = run(backend).sequences[0].tokens
    stop = tokenizer.decode(greedy[1:3])  # two characters: the end of token 1 and token 2
    end = next(n for n in range(1, 5) if stop in tokenizer.decode(greedy[:n]))
    assert end >= 2
    out = run(backend, stop_strings=("never", stop)).sequences[0]
    assert out.stop_reason == "stop"
    np.testing.assert_array_equal(out.tokens, greedy[:end])
    assert tokenizer.decode(out.tokens).endswith(stop)


def test_no_stop_strings_decode_nothing(setup):
    backend, _, _, tokenizer = setup
    run(backend, stop_token_ids=(1,))
    assert tokenizer.calls == 0


def test_length_limits(setup):
    backend = setup[0]
    assert run(backend, max_tokens=2).sequences[0].stop_reason == "length"
    assert len(run(backend, max_tokens=2).sequences[0].tokens) == 2
    out = run(backend, max_tokens=10, temperature=1.0).sequences[0]  # 8 prompt tokens, max_seq_len 12
    assert out.stop_reason == "length" and len(out.tokens) == 4


def test_real_tokenizer_stop_string():
    backend = EmulatorBackend(BackendConfig(catalog=Catalog()))
    prompt = np.array([300, 301, 302, 303])
    params = dict(
        adapter_id=None,
        base_model="bios/tiny",
        prompt=prompt,
        num_samples=1,
        max_tokens=6,
        temperature=0.0,
        top_k=-1,
        top_p=1.0,
        seed=None,
        stop_token_ids=(),
    )
    greedy = backend.sample([SampleWork(**params, stop_strings=())])[0].sequences[0].tokens
    tokenizer = Catalog().get("bios/tiny").tokenizer()
    stop = tokenizer.decode(list(greedy[:3]))[-2:]
    end = next(n for n in range(1, 7) if stop in tokenizer.decode(list(greedy[:n])))
    out = backend.sample([SampleWork(**params, stop_strings=(stop,))])[0].sequences[0]
    assert out.stop_reason == "stop"
    np.testing.assert_array_equal(out.tokens, greedy[:end])
