"""`EmulatorBackend` as the engine sees it: per-item errors that change nothing, gradient
accumulation (L8), dropout (M1), the export/create round trip and the factory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import emulator
from bios.backend import (
    AdapterSpec,
    AdapterState,
    Backend,
    BackendConfig,
    ForwardBackwardOutput,
    ForwardBackwardWork,
    OptimStepWork,
)
from bios.catalog import Catalog, ModelSpec
from bios.errors import ConflictError, InvalidRequestError, NotFoundError
from bios.weights import dropout_scale
from emulator.backend import EmulatorBackend
from emulator.model import Lora, forward, token_logprobs

SPEC = ModelSpec(
    name="test/tiny",
    vocab_size=50,
    d_model=16,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=4,
    d_ff=24,
    architecture="qwen2",
    weights_seed=6,
)
OTHER = ModelSpec(
    name="test/other",
    vocab_size=50,
    d_model=8,
    n_layers=1,
    n_heads=2,
    n_kv_heads=2,
    head_dim=4,
    d_ff=16,
    tie_embeddings=True,
    weights_seed=8,
)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
ADAM = OptimStepWork("a", learning_rate=0.05, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)


def make_backend(dropout: float = 0.0) -> EmulatorBackend:
    backend = emulator.create_backend(BackendConfig(catalog=Catalog({SPEC.name: SPEC, OTHER.name: OTHER})))
    spec = AdapterSpec("a", SPEC.name, rank=4, alpha=8.0, target_modules=MODULES, dropout=dropout, seed=3)
    backend.create_adapter(spec)
    return backend


def batch(seed: int, n: int) -> tuple[tuple[np.ndarray, ...], tuple[dict, ...]]:
    rng = np.random.default_rng(seed)
    tokens = tuple(rng.integers(0, 50, rng.integers(3, 9)) for _ in range(n))
    inputs = tuple(
        {
            "target_tokens": rng.integers(0, 50, len(t)),
            "logprobs": rng.normal(-4.0, 0.5, len(t)),
            "advantages": rng.normal(size=len(t)),
        }
        for t in tokens
    )
    return tokens, inputs


def fb(tokens, inputs, adapter_id="a", backward=True, loss_fn="ppo", base_model=SPEC.name) -> ForwardBackwardWork:
    config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    return ForwardBackwardWork(adapter_id, base_model, loss_fn, config, tokens, inputs, backward)


def grads(backend: EmulatorBackend, adapter_id: str = "a") -> dict[str, np.ndarray]:
    return backend.pending_gradient(adapter_id)


def trained(backend: EmulatorBackend, steps: int = 2) -> None:
    for step in range(steps):
        assert isinstance(backend.forward_backward([fb(*batch(step, 3))])[0], ForwardBackwardOutput)
        backend.optim_step([ADAM])


def assert_states_equal(a: AdapterState, b: AdapterState) -> None:
    assert a.step == b.step
    for field in ("weights", "adam_m", "adam_v"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.keys() == y.keys()
        for name in x:
            assert x[name].dtype == np.float64
            np.testing.assert_array_equal(x[name], y[name])


def test_factory_builds_a_backend():
    backend = make_backend()
    assert isinstance(backend, Backend) and backend.name == "emulator"


def test_output_sums_the_elementwise_loss():
    backend = make_backend()
    out = backend.forward_backward([fb(*batch(0, 3))])[0]
    assert out.loss == pytest.approx(sum(float(e.sum()) for e in out.elementwise_loss), rel=1e-15)
    assert out.metrics == {"loss:sum": out.loss}
    assert [len(lp) for lp in out.logprobs] == [len(t) for t in batch(0, 3)[0]]
    assert all(lp.dtype == np.float64 for lp in out.logprobs)


def test_failing_items_return_errors_and_change_nothing():
    backend = make_backend()
    trained(backend)
    before, acc_before = backend.export_state("a"), grads(backend)
    bad = [
        fb(*batch(5, 2), adapter_id="missing"),
        fb(*batch(5, 2), base_model="test/other"),  # the adapter lives on test/tiny
        fb(*batch(5, 2), base_model="no/such-model"),
        fb(*batch(5, 2), adapter_id=None),  # backward needs an adapter
        fb(*batch(5, 2), loss_fn="mse"),
    ]
    results = backend.forward_backward(bad)
    expected_errors = [NotFoundError, InvalidRequestError, NotFoundError, InvalidRequestError, InvalidRequestError]
    assert [type(r) for r in results] == expected_errors
    assert_states_equal(backend.export_state("a"), before)
    assert all(np.array_equal(acc_before[k], g) for k, g in grads(backend).items())
    assert isinstance(backend.optim_step([dataclasses.replace(ADAM, adapter_id="missing")])[0], NotFoundError)

    alone = make_backend()
    alone.create_adapter(AdapterSpec("b", SPEC.name, 4, 8.0, MODULES), backend.export_state("a"))
    expected = alone.forward_backward([fb(*batch(6, 2), adapter_id="b"), fb(*batch(7, 3), adapter_id="b")])
    mixed = backend.forward_backward([fb(*batch(6, 2)), bad[0], fb(*batch(7, 3))])
    assert isinstance(mixed[1], NotFoundError)
    for got, want in ((mixed[0], expected[0]), (mixed[2], expected[1])):
        assert got.loss == want.loss
        for a, b in zip(got.logprobs, want.logprobs):
            np.testing.assert_array_equal(a, b)
    for name, g in grads(backend).items():
        np.testing.assert_allclose(g - acc_before[name], grads(alone, "b")[name], rtol=1e-12, atol=1e-14)


def test_two_halves_accumulate_the_same_gradient_as_the_union():
    tokens, inputs = batch(9, 6)
    halves, union = make_backend(), make_backend()
    trained(halves, 1)
    trained(union, 1)
    halves.forward_backward([fb(tokens[:2], inputs[:2])])
    halves.forward_backward([fb(tokens[2:], inputs[2:])])
    union.forward_backward([fb(tokens, inputs)])
    for name, g in grads(union).items():
        assert np.abs(g).max() > 0
        np.testing.assert_allclose(grads(halves)[name], g, rtol=0, atol=1e-12)


def test_forward_only_accumulates_nothing_and_base_model_runs_without_adapter():
    backend = make_backend()
    trained(backend, 1)
    tokens, inputs = batch(2, 2)
    out = backend.forward_backward([fb(tokens, inputs, backward=False)])[0]
    assert all(not g.any() for g in grads(backend).values())
    base_out = backend.forward_backward([fb(tokens, inputs, adapter_id=None, backward=False)])[0]
    base = backend.base_weights(SPEC.name)
    for t, i, lp in zip(tokens, inputs, base_out.logprobs):
        np.testing.assert_allclose(lp, token_logprobs(forward(SPEC, base, None, t)[0], i["target_tokens"]), rtol=1e-13)
    assert not np.allclose(out.logprobs[0], base_out.logprobs[0])


def test_dropout_only_in_training_with_the_host_masks():
    backend = make_backend(dropout=0.5)
    trained(backend, 1)  # step 1: masks are keyed by the current step
    tokens, inputs = batch(4, 2)
    state = backend.export_state("a")
    base = backend.base_weights(SPEC.name)
    no_drop = backend.forward_backward([fb(tokens, inputs, backward=False)])[0]
    with_drop = backend.forward_backward([fb(tokens, inputs)])[0]
    for datum, (t, i) in enumerate(zip(tokens, inputs)):

        def masks(path, shape, datum=datum):
            return dropout_scale(3, 1, datum, path, shape, 0.5).astype(np.float64)

        expect_train = token_logprobs(forward(SPEC, base, Lora(state.weights, 2.0, masks), t)[0], i["target_tokens"])
        expect_eval = token_logprobs(forward(SPEC, base, Lora(state.weights, 2.0), t)[0], i["target_tokens"])
        np.testing.assert_allclose(with_drop.logprobs[datum], expect_train, rtol=1e-13)
        np.testing.assert_allclose(no_drop.logprobs[datum], expect_eval, rtol=1e-13)
        assert not np.allclose(expect_train, expect_eval)


def test_export_create_round_trip_is_exact():
    backend = make_backend()
    trained(backend, 2)
    state = backend.export_state("a")
    backend.create_adapter(AdapterSpec("copy", SPEC.name, 4, 8.0, MODULES, seed=3), state)
    assert_states_equal(backend.export_state("copy"), state)
    work = batch(11, 2)
    for adapter_id in ("a", "copy"):
        backend.forward_backward([fb(*work, adapter_id=adapter_id)])
        backend.optim_step([dataclasses.replace(ADAM, adapter_id=adapter_id)])
    assert_states_equal(backend.export_state("copy"), backend.export_state("a"))
    state.weights[next(iter(state.weights))][...] = 0.0  # an exported state is a copy
    assert backend.export_state("a").weights[next(iter(state.weights))].any()


def test_create_from_float32_weights_only_state():
    backend = make_backend()
    trained(backend, 1)
    state = backend.export_state("a")
    light = AdapterState(state.spec, 5, {k: v.astype(np.float32) for k, v in state.weights.items()})
    backend.create_adapter(AdapterSpec("light", SPEC.name, 4, 8.0, MODULES), light)
    got = backend.export_state("light")
    assert got.step == 5
    for name, w in got.weights.items():
        assert w.dtype == np.float64
        np.testing.assert_array_equal(w, state.weights[name].astype(np.float32).astype(np.float64))
        assert not got.adam_m[name].any() and not got.adam_v[name].any()


def test_create_rejects_duplicates_bad_states_and_unknown_models():
    backend = make_backend()
    state = backend.export_state("a")
    with pytest.raises(ConflictError):
        backend.create_adapter(AdapterSpec("a", SPEC.name, 4, 8.0, MODULES))
    with pytest.raises(InvalidRequestError):
        backend.create_adapter(AdapterSpec("b", SPEC.name, 2, 8.0, MODULES), state)  # rank 2 vs state rank 4
    with pytest.raises(InvalidRequestError):
        backend.create_adapter(AdapterSpec("b", SPEC.name, 4, 8.0, ("qkv",)))
    with pytest.raises(NotFoundError):
        backend.create_adapter(AdapterSpec("b", "no/such-model", 4, 8.0, MODULES))
    assert "b" not in backend.adapter_ids()


def test_delete_and_close():
    backend = make_backend()
    backend.delete_adapter("a")
    backend.delete_adapter("never-existed")
    with pytest.raises(NotFoundError):
        backend.export_state("a")
    backend.create_adapter(AdapterSpec("a", SPEC.name, 4, 8.0, MODULES))
    backend.close()
    assert isinstance(backend.forward_backward([fb(*batch(0, 1))])[0], NotFoundError)
