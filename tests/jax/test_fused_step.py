"""The fused training step on the JAX backend: a forward_backward queued with the optim_step
right after it runs as one program (`train_update`, then `write_back`), with the results of the
two run in turn: for several adapters at once (including the padding that repeats one), over
gradients already pending, and through `train`; what cannot fuse (several micro-batches) runs
as before."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

import bios
from backends.jax import compiled
from bios import types

MODEL = "bios/tiny"
ADAM = types.AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=5.0)


def _data(seed: int, size: int = 2, length: int = 24) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(4, 4000, length + 1).tolist() for _ in range(size)]
    return [
        types.Datum(model_input=types.ModelInput.from_ints(t[:-1]), loss_fn_inputs={"target_tokens": t[1:]})
        for t in tokens
    ]


def _held(service: bios.ServiceClient, submit: Callable[[], list]) -> list:
    """What `submit()` returns, having submitted it while the engine's worker was parked, so that
    everything it queued is taken in one round."""
    entered, gate = threading.Event(), threading.Event()
    service.transport.scheduler.call(lambda: (entered.set(), gate.wait()))
    entered.wait()
    try:
        return submit()
    finally:
        gate.set()


def _weights(client: bios.TrainingClient, service: bios.ServiceClient) -> dict[str, np.ndarray]:
    return service.transport.backend.lora_arrays(client.session_id)


def _count_fused_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gains, at every run of the fused program, the number of adapter places it steps."""
    runs: list[int] = []
    program = compiled.train_update

    def counted(*args: object, **kwargs: object) -> object:
        runs.append(len(args[5]))  # type: ignore[arg-type]  # adapters [A]
        return program(*args, **kwargs)

    monkeypatch.setattr(compiled, "train_update", counted)
    return runs


@pytest.fixture(scope="module")
def service() -> bios.ServiceClient:
    return bios.ServiceClient(backend="jax")


def _sessions(service: bios.ServiceClient, ranks: tuple[int, ...]) -> list[bios.TrainingClient]:
    return [service.create_lora_training_client(MODEL, rank=rank, seed=10 + i) for i, rank in enumerate(ranks)]


def test_three_sessions_fused_step_as_their_twins_step_apart(
    service: bios.ServiceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three adapters (a bucket of four places, one repeated), each with a gradient already
    pending: one fused call gives each the losses, grad norm, step and weights its twin gets from
    a forward_backward and an optim_step run one after the other."""
    ranks = (4, 8, 8)
    fused, apart = _sessions(service, ranks), _sessions(service, ranks)
    for i, (one, twin) in enumerate(zip(fused, apart, strict=True)):
        one.forward_backward(_data(100 + i)).result()
        twin.forward_backward(_data(100 + i)).result()
    calls, fused_runs = service.transport.scheduler.backend_calls, _count_fused_runs(monkeypatch)
    futures = _held(service, lambda: [(s.forward_backward(_data(i)), s.optim_step(ADAM)) for i, s in enumerate(fused)])
    results = [(fb.result(timeout=120), step.result(timeout=120)) for fb, step in futures]
    assert service.transport.scheduler.backend_calls - calls == 1 and fused_runs == [4]  # one program, 4 places
    for i, (twin, (fb, step)) in enumerate(zip(apart, results, strict=True)):
        alone = twin.forward_backward(_data(i)).result()
        twin_step = twin.optim_step(ADAM).result()
        assert fb.loss == pytest.approx(alone.loss, rel=1e-6)
        for got, want in zip(fb.loss_fn_outputs, alone.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(got["logprobs"].to_numpy(), want["logprobs"].to_numpy(), atol=1e-5)
        assert step.step == twin_step.step == 1
        assert step.metrics["grad_norm"] == pytest.approx(twin_step.metrics["grad_norm"], rel=1e-5)
        assert step.metrics["grad_norm"] > 0
        got_weights, want_weights = _weights(fused[i], service), _weights(twin, service)
        for name in want_weights:
            np.testing.assert_allclose(got_weights[name], want_weights[name], atol=1e-6, err_msg=name)
    # the fused step cleared the pending gradients: a step now has nothing to apply
    assert fused[0].optim_step(ADAM).result().metrics["grad_norm"] == 0.0


def test_train_runs_the_fused_program_and_equals_the_two_calls(
    service: bios.ServiceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, twin = _sessions(service, (8,)), _sessions(service, (8,))
    calls, fused_runs = service.transport.scheduler.backend_calls, _count_fused_runs(monkeypatch)
    trained = [one[0].train(_data(7 + i), learning_rate=1e-2) for i in range(3)]
    assert service.transport.scheduler.backend_calls - calls == 3 and fused_runs == [1, 1, 1]  # one program each
    for i, result in enumerate(trained):
        fb = twin[0].forward_backward(_data(7 + i)).result()
        step = twin[0].optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert result.loss == pytest.approx(fb.loss, rel=1e-6) and result.step == step.step == i + 1
        assert result.metrics["grad_norm"] == pytest.approx(step.metrics["grad_norm"], rel=1e-5)


def test_a_step_over_several_micro_batches_is_not_fused_and_gives_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    budgeted = bios.ServiceClient(backend="jax", backend_options={"tokens_per_call": "64"})
    plain = bios.ServiceClient(backend="jax")
    one = budgeted.create_lora_training_client(MODEL, rank=8, seed=3)
    twin = plain.create_lora_training_client(MODEL, rank=8, seed=3)
    data = _data(5, size=4, length=40)  # 160 tokens: at least three calls of 64
    calls, fused_runs = budgeted.transport.scheduler.backend_calls, _count_fused_runs(monkeypatch)
    got = one.train(data, learning_rate=1e-2)
    assert budgeted.transport.scheduler.backend_calls - calls == 1 and fused_runs == []  # one pair, run apart
    want = twin.train(data, learning_rate=1e-2)
    assert got.loss == pytest.approx(want.loss, rel=1e-5) and got.step == want.step == 1
    assert got.metrics["grad_norm"] == pytest.approx(want.metrics["grad_norm"], rel=1e-4)
