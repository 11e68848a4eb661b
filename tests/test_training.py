"""Training through the public API: loss falls, steps count, gradients are right, and state
round-trips exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import MODEL, make_datum, random_batch, saved_state, saved_weights

import bios
from bios import types
from bios.catalog import ModelSpec
from emulator.model import Lora, forward, token_logprobs

pytestmark = pytest.mark.api

MICRO = ModelSpec(
    name="test/micro",
    vocab_size=64,
    d_model=16,
    n_layers=1,
    n_heads=2,
    n_kv_heads=1,
    head_dim=8,
    d_ff=32,
    max_seq_len=32,
    weights_seed=7,
    max_lora_rank=8,
)


def test_twenty_train_steps_lower_the_loss_and_count_steps(training):
    batch = random_batch(seed=1, size=4, length=10)
    results = [training.train(batch, learning_rate=1e-2) for _ in range(20)]
    losses = [r.loss for r in results]
    assert [r.step for r in results] == list(range(1, 21))
    assert losses[-1] < 0.5 * losses[0]
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 15
    assert all(r.metrics["learning_rate"] == 1e-2 and np.isfinite(r.metrics["grad_norm"]) for r in results)
    assert training.get_info().step == 20


def _micro_loss(
    weights: dict[str, np.ndarray], base: dict[str, np.ndarray], data: list[types.Datum], scale: float
) -> float:
    total = 0.0
    for datum in data:
        logits, _ = forward(MICRO, base, Lora(weights, scale), np.array(datum.model_input.to_ints()))
        total -= token_logprobs(logits, np.array(datum.loss_fn_inputs["target_tokens"].data)).sum()
    return total


@pytest.mark.inprocess
def test_grad_norm_matches_finite_differences(service):
    engine = service.transport
    engine.catalog.register(MICRO)
    client = service.create_lora_training_client(base_model=MICRO.name, rank=4, alpha=8)
    batch = random_batch(seed=2, size=3, length=8, vocab=MICRO.vocab_size)
    base = {k: v.astype(np.float64) for k, v in engine.backend.base_weights(MICRO.name).items()}
    for step in range(1, 21):
        before = saved_weights(client.save_state(f"fd-{step}").result().path) if step in (2, 20) else None
        result = client.train(batch, learning_rate=5e-2)
        if before is None:
            continue
        squared = 0.0
        for name, tensor in before.items():
            for index in np.ndindex(tensor.shape):
                plus, minus = dict(before), dict(before)
                plus[name], minus[name] = tensor.copy(), tensor.copy()
                plus[name][index] += 1e-6
                minus[name][index] -= 1e-6
                squared += ((_micro_loss(plus, base, batch, 2.0) - _micro_loss(minus, base, batch, 2.0)) / 2e-6) ** 2
        assert np.isclose(result.metrics["grad_norm"], np.sqrt(squared), rtol=1e-6), (
            step,
            result.metrics["grad_norm"],
            np.sqrt(squared),
        )


def test_accumulating_two_calls_equals_one_call_on_the_union(service):
    batch = random_batch(seed=3, size=6, length=9)
    split = service.create_lora_training_client(base_model=MODEL, rank=8, seed=5)
    union = service.create_lora_training_client(base_model=MODEL, rank=8, seed=5)
    adam = types.AdamParams(learning_rate=1e-2)
    for _ in range(2):  # the second round has non-zero B, so every factor gets a gradient
        first, second = split.forward_backward(batch[:2]), split.forward_backward(batch[2:])
        split_step = split.optim_step(adam).result()
        whole = union.forward_backward(batch)
        union_step = union.optim_step(adam).result()
        assert np.isclose(first.result().loss + second.result().loss, whole.result().loss, rtol=1e-12)
        assert np.isclose(split_step.metrics["grad_norm"], union_step.metrics["grad_norm"], rtol=1e-12)
    split_weights = saved_weights(split.save_state("split").result().path)
    union_weights = saved_weights(union.save_state("union").result().path)
    for name in union_weights:
        np.testing.assert_allclose(split_weights[name], union_weights[name], rtol=1e-11, atol=1e-14)


def test_optim_step_clears_the_accumulated_gradient(training):
    batch = random_batch(seed=4)
    training.forward_backward(batch)
    first = training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    second = training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert first.metrics["grad_norm"] > 0 and second.metrics["grad_norm"] == 0.0
    assert second.step == 2


def test_train_equals_forward_backward_then_optim_step(service):
    batch = random_batch(seed=5)
    one_call = service.create_lora_training_client(base_model=MODEL, rank=8, seed=9)
    two_calls = service.create_lora_training_client(base_model=MODEL, rank=8, seed=9)
    for _ in range(3):
        trained = one_call.train(batch, learning_rate=3e-3, weight_decay=0.1, grad_clip=1.0, beta2=0.99)
        fb = two_calls.forward_backward(batch)
        opt = two_calls.optim_step(
            types.AdamParams(learning_rate=3e-3, weight_decay=0.1, grad_clip_norm=1.0, beta2=0.99)
        )
        assert trained.loss == fb.result().loss
        assert trained.step == opt.result().step
        assert trained.metrics["grad_norm"] == opt.result().metrics["grad_norm"]
    a, b = saved_weights(one_call.save_state("a").result().path), saved_weights(two_calls.save_state("b").result().path)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _continue(client: bios.TrainingClient, batch: list[types.Datum], steps: int) -> list[float]:
    return [client.train(batch, learning_rate=1e-2).loss for _ in range(steps)]


def test_save_and_load_state_resumes_bit_identically(service, training):
    batch = random_batch(seed=6)
    _continue(training, batch, 3)
    checkpoint = training.save_state("resume-point", metadata={"note": "after 3 steps"}).result()
    assert checkpoint.step == 3 and checkpoint.metadata == {"note": "after 3 steps"}
    uninterrupted = _continue(training, batch, 2)
    final = saved_weights(training.save_state("uninterrupted").result().path)

    resumed = service.create_training_client_from_state_with_optimizer(checkpoint.path)
    assert resumed.get_info().step == 3
    assert _continue(resumed, batch, 2) == uninterrupted
    resumed_final = saved_weights(resumed.save_state("resumed").result().path)
    assert all(np.array_equal(final[k], resumed_final[k]) for k in final)

    training.load_state_with_optimizer(checkpoint.path)  # into the same session: moments come back too
    assert training.get_info().step == 3
    assert _continue(training, batch, 2) == uninterrupted


def test_load_state_and_from_state_take_the_weights_with_a_fresh_optimizer(service, training):
    """As in the tinker SDK: the plain calls restore the weights only (step 0, zero Adam
    moments); the `_with_optimizer` calls resume the moments and step as well."""
    batch = random_batch(seed=9)
    _continue(training, batch, 2)
    path = training.save_state("weights-and-moments").result().path
    saved = saved_state(path)

    fresh = service.create_training_client_from_state(path)
    reloaded = service.create_lora_training_client(base_model=MODEL, rank=8, seed=5).load_state(path)
    resumed = service.create_training_client_from_state_with_optimizer(path)
    assert [c.get_info().step for c in (fresh, reloaded, resumed)] == [0, 0, 2]
    for client, name in ((fresh, "fresh"), (reloaded, "reloaded")):
        state = saved_state(client.save_state(name).result().path)
        assert all(np.array_equal(state.weights[k], saved.weights[k]) for k in saved.weights)
        assert all(not np.any(m) for m in state.adam_m.values()) and all(not np.any(v) for v in state.adam_v.values())
    first_steps = [client.train(batch, learning_rate=1e-2) for client in (fresh, reloaded, resumed)]
    assert [r.step for r in first_steps] == [1, 1, 3]
    after = [saved_weights(c.save_state(f"after-{i}").result().path) for i, c in enumerate((fresh, reloaded, resumed))]
    assert all(np.array_equal(after[0][k], after[1][k]) for k in after[0])  # the same fresh Adam step
    assert any(not np.array_equal(after[0][k], after[2][k]) for k in after[0])  # moments change the step


def test_load_state_discards_pending_gradients(service):
    batch = random_batch(seed=7)
    client = service.create_lora_training_client(base_model=MODEL, rank=8, seed=1)
    client.train(batch, learning_rate=1e-2)
    path = client.save_state("clean").result().path
    reference = _continue(service.create_training_client_from_state_with_optimizer(path), batch, 1)
    client.forward_backward(random_batch(seed=8))  # pending, then discarded by load_state
    assert _continue(client.load_state_with_optimizer(path), batch, 1) == reference


def test_weighted_cross_entropy_is_a_plain_sum(training):
    tokens = list(range(10, 22))
    unweighted = training.forward([make_datum(tokens)]).result()
    weights = [0.0] * 5 + [2.0] * 6
    weighted = training.forward([make_datum(tokens, weights)]).result()
    logprobs = np.array(unweighted.loss_fn_outputs[0]["logprobs"].data, dtype=np.float64)
    assert np.isclose(unweighted.loss, -logprobs.sum(), rtol=1e-6)
    assert np.isclose(weighted.loss, -(np.array(weights) * logprobs).sum(), rtol=1e-6)
    elementwise = np.array(weighted.loss_fn_outputs[0]["elementwise_loss"].data)
    np.testing.assert_allclose(elementwise, -np.array(weights) * logprobs, rtol=1e-5, atol=1e-6)


def test_policy_losses_run_and_report_logprobs(training):
    tokens = list(range(30, 42))
    plain = training.forward([make_datum(tokens)]).result()
    logprobs = np.array(plain.loss_fn_outputs[0]["logprobs"].data, dtype=np.float64)
    advantages = np.linspace(-0.5, 1.5, len(logprobs))
    sampler = logprobs - 0.5  # ratio e^0.5 ≈ 1.65, outside PPO's clip range
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": sampler.astype(np.float32), "advantages": advantages},
    )
    ratio = np.exp(logprobs - sampler.astype(np.float32))
    expected = {
        "importance_sampling": -(ratio * advantages).sum(),
        "ppo": -np.minimum(ratio * advantages, np.clip(ratio, 0.8, 1.2) * advantages).sum(),
        "cispo": -(np.clip(ratio, 0.8, 1.2) * logprobs * advantages).sum(),
        "dro": -(logprobs * advantages - 0.025 * (logprobs - sampler.astype(np.float32)) ** 2).sum(),
        "gspo": -np.minimum(ratio[6:].prod() ** (1 / 5) * advantages, 1.2 * advantages).sum(),  # s = e^0.5 > 1.2
    }
    marked = np.arange(len(logprobs)) >= 6
    gspo_datum = types.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={**datum.loss_fn_inputs, "sequence_ratio_mask": marked.astype(float)},
    )
    for loss_fn, value in expected.items():
        result = training.forward([gspo_datum if loss_fn == "gspo" else datum], loss_fn=loss_fn).result()
        assert np.isclose(result.loss, value, rtol=1e-5), loss_fn
    wider = training.forward(
        [datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
    ).result()
    assert np.isclose(wider.loss, -(ratio * advantages).sum(), rtol=1e-5)


@pytest.mark.inprocess
def test_a_dropped_training_client_ends_its_session_once_its_requests_are_done(service):
    import gc

    engine = service.transport
    client = service.create_lora_training_client(MODEL, rank=4, seed=31)
    session_id = client.session_id
    pending = client.forward_backward(random_batch(seed=31))
    del client
    gc.collect()
    assert pending.result().loss > 0  # the request kept its client, and so its session, alive
    del pending
    gc.collect()
    engine.scheduler.call(lambda: None).result()  # the adapter is freed on the worker
    with pytest.raises(bios.NotFoundError):
        engine.session_info(session_id)
    with pytest.raises(bios.NotFoundError):
        engine.backend.export_state(session_id)
