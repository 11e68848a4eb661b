"""Sampling through the public API: determinism, seeds, stop rules, logprobs, frozen snapshots."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import MODEL, random_batch

import bios
from bios import types

pytestmark = pytest.mark.api

GREEDY = types.SamplingParams(max_tokens=12, temperature=0.0)


def _prompt(tokens: list[int] | None = None) -> types.ModelInput:
    return types.ModelInput.from_ints(tokens or [0, 310, 52, 977, 41])


def _next_token_logprobs(service, prompt: types.ModelInput) -> np.ndarray:
    """log p(t | prompt) under the base model for every token t of the vocabulary [4096]: one
    `forward` of a fresh adapter (B = 0, so the base model's numbers) on 4096 data, one per t."""
    tokens = prompt.to_ints()
    data = [types.Datum(model_input=prompt, loss_fn_inputs={"target_tokens": tokens[1:] + [t]}) for t in range(4096)]
    fresh = service.create_lora_training_client(MODEL, rank=1)
    return np.asarray([out["logprobs"].to_numpy()[-1] for out in fresh.forward(data).result().loss_fn_outputs])


def test_greedy_is_deterministic_and_its_logprobs_equal_compute_logprobs(service, training):
    first = training.sample(_prompt(), GREEDY).result().sequences[0]
    second = training.sample(_prompt(), GREEDY).result().sequences[0]
    assert first.tokens == second.tokens and first.stop_reason == "length" and len(first.tokens) == 12
    sampler = training.save_weights_and_get_sampling_client("greedy")
    full = sampler.compute_logprobs(_prompt(_prompt().to_ints() + first.tokens)).result()
    np.testing.assert_allclose(full[-12:], first.logprobs, rtol=1e-9)


def test_greedy_takes_the_most_likely_token(service):
    sampler = service.create_sampling_client(base_model=MODEL)
    prompt = _prompt()
    token = sampler.sample(prompt, types.SamplingParams(max_tokens=1, temperature=0.0)).result().sequences[0].tokens[0]
    assert token == int(np.argmax(_next_token_logprobs(service, prompt)))


def test_a_seed_makes_temperature_sampling_reproducible(service):
    sampler = service.create_sampling_client(base_model=MODEL)
    params = types.SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    a = sampler.sample(_prompt(), params, num_samples=3).result()
    b = sampler.sample(_prompt(), params, num_samples=3).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) > 1  # the samples of one request differ
    other = sampler.sample(_prompt(), params.model_copy(update={"seed": 99}), num_samples=3).result()
    assert [s.tokens for s in other.sequences] != [s.tokens for s in a.sequences]


def test_sampled_tokens_lie_in_the_top_k_set(service):
    sampler = service.create_sampling_client(base_model=MODEL)
    prompt = _prompt()
    allowed = np.argsort(-_next_token_logprobs(service, prompt), kind="stable")[:3]
    params = types.SamplingParams(max_tokens=1, temperature=2.0, top_k=3, seed=0)
    drawn = {s.tokens[0] for s in sampler.sample(prompt, params, num_samples=40).result().sequences}
    assert drawn <= set(allowed.tolist()) and len(drawn) > 1


def test_max_tokens_ends_with_length(training):
    result = training.sample(_prompt(), types.SamplingParams(max_tokens=5, temperature=0.0)).result()
    assert len(result.sequences[0].tokens) == 5 and result.sequences[0].stop_reason == "length"


def test_stop_token_id_ends_the_sequence_and_is_kept(training):
    tokens = training.sample(_prompt(), GREEDY).result().sequences[0].tokens
    stop_id = tokens[3]
    stopped = (
        training.sample(_prompt(), types.SamplingParams(max_tokens=12, temperature=0.0, stop=[stop_id]))
        .result()
        .sequences[0]
    )
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == tokens[: tokens.index(stop_id) + 1]


def test_stop_string_spanning_tokens_ends_the_sequence(training):
    tokenizer = training.get_tokenizer()
    tokens = training.sample(_prompt(), GREEDY).result().sequences[0].tokens
    text = tokenizer.decode(tokens)
    boundary = len(tokenizer.decode(tokens[:4]))
    stop = text[boundary - 2 : boundary + 2]  # two characters each side of a token boundary
    assert len(stop) == 4
    params = types.SamplingParams(max_tokens=12, temperature=0.0, stop=[stop, "never-generated-text"])
    stopped = training.sample(_prompt(), params).result().sequences[0]
    completion = tokenizer.decode(stopped.tokens)
    assert stopped.stop_reason == "stop" and stop in completion
    assert stop not in tokenizer.decode(stopped.tokens[:-1])  # it ended at the first token completing the match
    assert stopped.tokens == tokens[: len(stopped.tokens)]


def test_compute_logprobs_equals_forward(training):
    tokens = [0, 15, 99, 2047, 7, 300, 301]
    forward = training.forward(
        [types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]})]
    ).result()
    sampler = training.save_weights_and_get_sampling_client("logprobs")
    computed = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert computed[0] is None
    np.testing.assert_allclose(computed[1:], forward.loss_fn_outputs[0]["logprobs"].data, rtol=1e-6)
    with_prompt = sampler.sample(types.ModelInput.from_ints(tokens), GREEDY, include_prompt_logprobs=True).result()
    np.testing.assert_allclose(with_prompt.prompt_logprobs[1:], computed[1:], rtol=1e-9)


def test_sampler_snapshots_are_immutable(service, training):
    batch = random_batch(seed=11)
    training.train(batch, learning_rate=1e-2)
    frozen = training.save_weights_and_get_sampling_client("frozen")
    before = frozen.sample(_prompt(), GREEDY).result().sequences[0]
    for _ in range(5):
        training.train(batch, learning_rate=5e-2)
    live = training.sample(_prompt(), GREEDY).result().sequences[0]
    after = frozen.sample(_prompt(), GREEDY).result().sequences[0]
    assert after.tokens == before.tokens and after.logprobs == before.logprobs
    assert live.logprobs != before.logprobs
    reopened = service.create_sampling_client(model_path=frozen_path(training, "frozen"))
    assert reopened.sample(_prompt(), GREEDY).result().sequences[0].tokens == before.tokens


def frozen_path(training, name: str) -> str:
    return f"bios://{training.session_id}/sampler_weights/{name}"


@pytest.mark.slow
@pytest.mark.inprocess
def test_snapshots_are_freed_when_no_sampling_client_uses_them(service):
    import gc

    engine = service.transport
    training = service.create_lora_training_client(MODEL, rank=4, seed=12)
    batch = random_batch(seed=13)
    live_before = engine.snapshots.live()
    sampler = None
    for step in range(12):  # an RL loop: new weights, a new sampling client, the old one dropped
        training.train(batch, learning_rate=1e-2)
        sampler = training.save_weights_and_get_sampling_client(f"rl-{step}")
        gc.collect()
        sampler.sample(_prompt(), GREEDY).result()
        assert engine.snapshots.live() - live_before <= 2
    first = sampler.sample(_prompt(), GREEDY).result().sequences[0].tokens
    twin = service.create_sampling_client(model_path=frozen_path(training, "rl-11"))  # shares the live adapter
    assert engine.snapshots.live() - live_before == 1
    del sampler, twin
    gc.collect()
    engine.scheduler.call(lambda: None).result()  # the release runs on the worker
    assert engine.snapshots.live() == live_before
    reloaded = service.create_sampling_client(model_path=frozen_path(training, "rl-11"))  # from disk again
    assert reloaded.sample(_prompt(), GREEDY).result().sequences[0].tokens == first


def test_a_temporary_sampling_client_lives_until_its_requests_are_done(service, training):
    import gc

    future = training.save_weights_and_get_sampling_client("temporary").sample(
        _prompt(), GREEDY
    )  # client dropped at once
    gc.collect()
    assert len(future.result().sequences[0].tokens) == 12


def test_topk_prompt_logprobs_are_the_most_likely_next_tokens(service):
    """Row t holds the k most likely tokens after prompt[:t], most likely first: the first is
    what greedy sampling of prompt[:t] draws, with the logprob it reports."""
    sampler = service.create_sampling_client(base_model=MODEL)
    tokens = [0, 310, 52, 977, 41]
    result = sampler.sample(_prompt(tokens), GREEDY, 1, True, 4).result()
    topk = result.topk_prompt_logprobs
    assert topk is not None and topk[0] is None and [len(row) for row in topk[1:]] == [4] * 4
    for t, row in enumerate(topk[1:], start=1):
        logprobs = [lp for _, lp in row]
        assert logprobs == sorted(logprobs, reverse=True) and sum(np.exp(logprobs)) <= 1 + 1e-6
        assert result.prompt_logprobs[t] <= logprobs[0] + 1e-6
        if tokens[t] in (ids := [token for token, _ in row]):
            assert logprobs[ids.index(tokens[t])] == pytest.approx(result.prompt_logprobs[t], abs=1e-5)
        greedy = sampler.sample(_prompt(tokens[:t]), types.SamplingParams(max_tokens=1, temperature=0.0)).result()
        assert greedy.sequences[0].tokens == [row[0][0]]
        assert greedy.sequences[0].logprobs[0] == pytest.approx(row[0][1], abs=1e-5)
    tail = sampler.sample(_prompt(tokens), GREEDY, 1, True, 2, prompt_logprobs_last_n=2).result()
    assert tail.prompt_logprobs[:3] == tail.topk_prompt_logprobs[:3] == [None] * 3
    assert tail.topk_prompt_logprobs[3:] == [row[:2] for row in topk[3:]]


@pytest.mark.parametrize("k", [-1, True, "3", 2.0, 10**6])
def test_a_bad_topk_prompt_logprobs_is_a_typed_error(service, k):
    sampler = service.create_sampling_client(base_model=MODEL)
    with pytest.raises(bios.InvalidRequestError) as bad:
        sampler.sample(_prompt(), GREEDY, topk_prompt_logprobs=k).result()
    assert bad.value.field == "topk_prompt_logprobs"
