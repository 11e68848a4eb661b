"""Adam(W) O1–O5: a two-step update worked by hand, and the same through the backend
(clipping, bias correction, weight decay, accumulator zeroed, step counted)."""

from __future__ import annotations

import math

import numpy as np

from bios.backend import AdapterSpec, BackendConfig, ForwardBackwardWork, OptimStepOutput, OptimStepWork
from bios.catalog import Catalog, ModelSpec
from bios.errors import NotFoundError
from emulator.backend import EmulatorBackend
from emulator.optim import adam_step, global_norm

HYPER = dict(learning_rate=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, grad_clip_norm=2.5)


def test_global_norm_o1_spans_all_tensors():
    assert global_norm({"a": np.array([3.0]), "b": np.array([[4.0, 0.0]])}) == 5.0


def test_two_steps_by_hand():
    weights = {"w": np.array([1.0, -2.0])}
    zeros = {"w": np.zeros(2)}
    # step 1: g = (3, 4), norm 5 > 2.5 so g ← (1.5, 2); m = 0.1 g, v = 0.01 g²; m̂ = g, v̂ = g².
    w1, m1, v1, norm1 = adam_step(weights, {"w": np.array([3.0, 4.0])}, zeros, zeros, 1, **HYPER)
    assert norm1 == 5.0
    np.testing.assert_allclose(m1["w"], [0.15, 0.2], rtol=1e-15)
    np.testing.assert_allclose(v1["w"], [0.0225, 0.04], rtol=1e-15)
    expected1 = [1.0 - 0.1 * (1.5 / (1.5 + 1e-8) + 0.01 * 1.0), -2.0 - 0.1 * (2.0 / (2.0 + 1e-8) + 0.01 * -2.0)]
    np.testing.assert_allclose(w1["w"], expected1, rtol=1e-14)
    # step 2: g = (0.3, -0.4), norm 0.5 < 2.5: no clipping.
    w2, m2, v2, norm2 = adam_step(w1, {"w": np.array([0.3, -0.4])}, m1, v1, 2, **HYPER)
    assert math.isclose(norm2, 0.5, rel_tol=1e-15)
    np.testing.assert_allclose(m2["w"], [0.9 * 0.15 + 0.1 * 0.3, 0.9 * 0.2 - 0.1 * 0.4], rtol=1e-14)
    np.testing.assert_allclose(v2["w"], [0.99 * 0.0225 + 0.01 * 0.09, 0.99 * 0.04 + 0.01 * 0.16], rtol=1e-14)
    m_hat = [0.165 / (1 - 0.9**2), 0.14 / (1 - 0.9**2)]
    v_hat = [0.023175 / (1 - 0.99**2), 0.0412 / (1 - 0.99**2)]
    expected2 = [w - 0.1 * (m / (math.sqrt(v) + 1e-8) + 0.01 * w) for w, m, v in zip(expected1, m_hat, v_hat)]
    np.testing.assert_allclose(w2["w"], expected2, rtol=1e-13)
    np.testing.assert_array_equal(weights["w"], [1.0, -2.0])  # inputs untouched


def test_clipping_off_when_zero():
    _w, m, _, norm = adam_step(
        {"w": np.zeros(1)},
        {"w": np.array([100.0])},
        {"w": np.zeros(1)},
        {"w": np.zeros(1)},
        1,
        **{**HYPER, "grad_clip_norm": 0.0},
    )
    assert norm == 100.0
    np.testing.assert_allclose(m["w"], [10.0])


def tiny_backend() -> EmulatorBackend:
    spec = ModelSpec(
        name="test/tiny",
        vocab_size=50,
        d_model=16,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=4,
        d_ff=24,
        weights_seed=2,
    )
    backend = EmulatorBackend(BackendConfig(catalog=Catalog({spec.name: spec})))
    backend.create_adapter(AdapterSpec("a", spec.name, rank=2, alpha=4.0, target_modules=("q_proj", "down_proj")))
    return backend


def accumulate(backend: EmulatorBackend, shift: int) -> None:
    tokens = np.arange(shift, shift + 6) % 50
    work = ForwardBackwardWork(
        "a",
        "test/tiny",
        "cross_entropy",
        {},
        (tokens,),
        ({"target_tokens": (tokens + 1) % 50, "weights": np.ones(6)},),
        True,
    )
    assert not isinstance(backend.forward_backward([work])[0], Exception)


def by_hand(theta, g, m, v, t, clip_factor, lr, beta1, beta2, eps, weight_decay):
    """O2–O5 for one scalar."""
    g = g * clip_factor
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
    return theta - lr * (m_hat / (math.sqrt(v_hat) + eps) + weight_decay * theta), m, v


def test_backend_two_steps_match_scalar_adam_and_zero_the_accumulator():
    backend = tiny_backend()
    state = backend.export_state("a")
    weights = {k: w.copy() for k, w in state.weights.items()}
    m = {k: np.zeros_like(w) for k, w in weights.items()}
    v = {k: np.zeros_like(w) for k, w in weights.items()}
    for t, shift in ((1, 0), (2, 7)):
        accumulate(backend, shift)
        grads = backend.pending_gradient("a")
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        clip = norm / 2 if t == 1 else norm * 2  # clip the first step only
        factor = clip / norm if norm > clip else 1.0
        out = backend.optim_step([OptimStepWork("a", **{**HYPER, "grad_clip_norm": clip})])[0]
        assert isinstance(out, OptimStepOutput) and out.step == t
        assert math.isclose(out.grad_norm, norm, rel_tol=1e-12)
        for name in weights:
            for index in np.ndindex(weights[name].shape):
                weights[name][index], m[name][index], v[name][index] = by_hand(
                    weights[name][index],
                    grads[name][index],
                    m[name][index],
                    v[name][index],
                    t,
                    factor,
                    HYPER["learning_rate"],
                    HYPER["beta1"],
                    HYPER["beta2"],
                    HYPER["eps"],
                    HYPER["weight_decay"],
                )
        assert all(not g.any() for g in backend.pending_gradient("a").values())
        after = backend.export_state("a")
        assert after.step == t
        for name in weights:
            np.testing.assert_allclose(after.weights[name], weights[name], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(after.adam_m[name], m[name], rtol=1e-12, atol=1e-18)
            np.testing.assert_allclose(after.adam_v[name], v[name], rtol=1e-12, atol=1e-18)


def test_unknown_adapter_optim_step_is_not_found():
    backend = tiny_backend()
    before = backend.export_state("a")
    out = backend.optim_step([OptimStepWork("nope", **HYPER)])
    assert isinstance(out[0], NotFoundError)
    assert backend.export_state("a").step == before.step
