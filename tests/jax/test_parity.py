"""The JAX backend against the emulator, through the public API, in float32 on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import MODEL, make_datum, random_batch, saved_weights

import bios
from bios import types

LOSS_RTOL = 1e-5
LOGPROB_ATOL = 1e-5  # float32 logprobs of O(10) magnitude, compared with float64 ones
WEIGHT_TOL = 1e-5
"""Relative Frobenius error allowed per LoRA tensor after optimizer steps. Elementwise, a
coordinate whose gradient is at float32 noise level (e.g. lm_head columns of tokens never
targeted) gets a noise-driven Adam update, bounded by a small fraction of the step size."""


def assert_same_adapter(got: dict, expected: dict, learning_rate: float) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        error = np.linalg.norm(got[name] - expected[name]) / max(np.linalg.norm(expected[name]), 1e-30)
        assert error < WEIGHT_TOL, (name, error)
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-3 * learning_rate, err_msg=name)


@pytest.fixture(scope="module")
def pair():
    return bios.ServiceClient(backend="emulator"), bios.ServiceClient(backend="jax")


def _policy_batch(seed: int, gspo: bool = False) -> list[types.Datum]:
    """Policy-loss data; with `gspo`, each datum's `sequence_ratio_mask` marks its last two thirds."""
    rng = np.random.default_rng(seed)
    data = []
    for length in (7, 12, 19):
        tokens = rng.integers(4, 4096, length + 1).tolist()
        sampler_lp = -rng.uniform(0.5, 9.0, length)  # ratios from ~0 to huge: clipping on both sides
        advantages = rng.normal(0, 1, length) * (rng.random(length) > 0.2)  # some zeros, some negative
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs": sampler_lp,
                    "advantages": advantages,
                    **({"sequence_ratio_mask": (np.arange(length) >= length // 3).astype(np.float32)} if gspo else {}),
                },
            )
        )
    return data


def _ce_batch(seed: int) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    return [
        make_datum(rng.integers(4, 4096, n).tolist(), (rng.random(n - 1) * (rng.random(n - 1) > 0.3)).tolist())
        for n in (5, 17, 33)
    ]


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"])
def test_losses_and_logprobs_match_the_emulator(pair, loss_fn):
    emulator, jax_ = (s.create_lora_training_client(MODEL, rank=8, seed=4, train_unembed=True) for s in pair)
    data = _ce_batch(1) if loss_fn == "cross_entropy" else _policy_batch(1, gspo=loss_fn == "gspo")
    for client in (emulator, jax_):  # one step first, so B is non-zero and every factor matters
        client.train(data, loss_fn=loss_fn, learning_rate=1e-2)
    expected, got = emulator.forward_backward(data, loss_fn).result(), jax_.forward_backward(data, loss_fn).result()
    assert np.isclose(got.loss, expected.loss, rtol=LOSS_RTOL, atol=1e-6)
    for e, g in zip(expected.loss_fn_outputs, got.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(g["logprobs"].data, e["logprobs"].data, atol=LOGPROB_ATOL, rtol=0)
        np.testing.assert_allclose(g["elementwise_loss"].data, e["elementwise_loss"].data, atol=1e-5, rtol=1e-5)


def test_lora_parameters_after_five_steps_match(pair):
    config = dict(rank=8, seed=6, target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"])
    emulator, jax_ = (s.create_lora_training_client(MODEL, **config) for s in pair)
    adam = types.AdamParams(learning_rate=5e-3, weight_decay=0.1, grad_clip_norm=5.0)
    for step in range(5):
        for client in (emulator, jax_):
            client.forward_backward(_ce_batch(step)[:2])
            client.forward_backward(_ce_batch(step)[2:])  # accumulation across calls
        e, g = emulator.optim_step(adam).result(), jax_.optim_step(adam).result()
        assert e.step == g.step == step + 1
        assert np.isclose(g.metrics["grad_norm"], e.metrics["grad_norm"], rtol=1e-5)
    expected, got = (
        saved_weights(emulator.save_state("e5").result().path),
        saved_weights(jax_.save_state("j5").result().path),
    )
    assert_same_adapter(got, expected, adam.learning_rate)


def test_two_sessions_in_one_batch_equal_each_alone(pair):
    _, service = pair
    first = service.create_lora_training_client(MODEL, rank=4, seed=1)
    second = service.create_lora_training_client(MODEL, rank=16, seed=2, train_unembed=True)
    data_a, data_b = random_batch(seed=31, size=2, length=9), random_batch(seed=32, size=3, length=21)
    for client, data in ((first, data_a), (second, data_b)):
        client.train(data, learning_rate=1e-2)
    alone_a, alone_b = first.forward(data_a).result(), second.forward(data_b).result()
    engine = service.transport
    calls = engine.scheduler.backend_calls
    together_a, together_b = first.forward(data_a), second.forward(data_b)
    together_a, together_b = together_a.result(), together_b.result()
    assert engine.scheduler.backend_calls - calls <= 2  # usually 1: both heads in one round
    assert np.isclose(together_a.loss, alone_a.loss, rtol=1e-6) and np.isclose(together_b.loss, alone_b.loss, rtol=1e-6)


def test_sessions_never_see_each_others_weights(pair):
    emulator, service = pair
    reference = emulator.create_lora_training_client(MODEL, rank=4, seed=8)
    mine = service.create_lora_training_client(MODEL, rank=4, seed=8)
    neighbour = service.create_lora_training_client(MODEL, rank=32, seed=9, train_unembed=True)
    data, noise = random_batch(seed=41), random_batch(seed=42)
    for _ in range(3):
        neighbour.forward_backward(noise)
        mine.forward_backward(data)
        reference.forward_backward(data)
        adam = types.AdamParams(learning_rate=1e-2, weight_decay=0.5)
        neighbour.optim_step(types.AdamParams(learning_rate=1.0, weight_decay=0.9))
        mine.optim_step(adam).result()
        reference.optim_step(adam).result()
    expected, got = (
        saved_weights(reference.save_state("ref").result().path),
        saved_weights(mine.save_state("mine").result().path),
    )
    assert_same_adapter(got, expected, 1e-2)


def test_unused_rank_columns_and_modules_stay_exactly_zero(pair):
    _, service = pair
    client = service.create_lora_training_client(MODEL, rank=4, seed=3, train_mlp=False)
    for _ in range(3):
        client.train(random_batch(seed=43), learning_rate=1e-2, weight_decay=0.1)
    backend = service.transport.backend
    lora = backend.lora_arrays(client.session_id)  # this adapter's slot, padded to the model's maximum rank
    assert np.abs(lora["lora.q_proj.a"][:, :, :4]).max() > 0
    assert np.all(lora["lora.q_proj.a"][:, :, 4:] == 0) and np.all(lora["lora.q_proj.b"][:, 4:, :] == 0)
    assert np.all(lora["lora.up_proj.a"] == 0) and np.all(lora["lora.lm_head.b"] == 0)


def test_state_saved_on_one_backend_loads_on_the_other(pair):
    emulator, service = pair
    batch = random_batch(seed=44)
    origin = service.create_lora_training_client(MODEL, rank=8, seed=5)
    for _ in range(3):
        origin.train(batch, learning_rate=1e-2)
    path = origin.save_state("portable").result().path
    session, _, name = path.removeprefix("bios://").split("/")
    assert (Path(os.environ["BIOS_HOME"]) / "checkpoints" / session / "weights" / name / "orbax").is_dir()
    on_emulator = emulator.create_training_client_from_state_with_optimizer(path)
    assert on_emulator.get_info().step == 3
    continued_jax, continued_emulator = (
        origin.train(batch, learning_rate=1e-2),
        on_emulator.train(batch, learning_rate=1e-2),
    )
    assert continued_jax.step == continued_emulator.step == 4
    assert np.isclose(continued_jax.loss, continued_emulator.loss, rtol=1e-5)
    back = service.create_training_client_from_state_with_optimizer(on_emulator.save_state("back").result().path)
    assert np.isclose(
        back.train(batch, learning_rate=1e-2).loss, on_emulator.train(batch, learning_rate=1e-2).loss, rtol=1e-5
    )
