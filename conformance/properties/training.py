"""Training: gradient accumulation (L0, L8), Adam(W) updates (O1–O5) seen through logprobs,
grad_norm and saved weights, and `train()` as forward_backward + optim_step."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from bios import types
from conformance import strategies as cs
from conformance import tolerances as tol
from conformance.harness import Pair
from conformance.properties import conformance_property

_ADAM_TRAIN_KWARGS = {
    "beta1": "beta1",
    "beta2": "beta2",
    "eps": "eps",
    "weight_decay": "weight_decay",
    "grad_clip_norm": "grad_clip",
}


@conformance_property(
    lora=cs.lora_configs,
    request=lambda spec: cs.loss_requests(spec, 5),
    split=lambda spec: st.integers(1, 4),
    adam=lambda spec: cs.adam_params(),
)
def prop_gradient_accumulation_equals_union(pair: Pair, lora, request, split, adam) -> None:
    """forward_backward on two parts then optim_step = forward_backward on their union then optim_step."""
    loss_fn, data, config = request
    if len(data) < 2:
        data = data + data
    k = min(split, len(data) - 1)
    parts, union, reference = pair.session(lora), pair.session(lora), pair.session(lora, "reference")
    for client in (parts, reference):
        first, second = (
            client.forward_backward(data[:k], loss_fn, config),
            client.forward_backward(data[k:], loss_fn, config),
        )
        first.result(), second.result()
    union_fb = union.forward_backward(data, loss_fn, config).result()
    steps = [client.optim_step(adam).result() for client in (parts, union, reference)]
    assert [s.step for s in steps] == [1, 1, 1], f"steps after one optim_step: {[s.step for s in steps]}"
    pair.close(
        "grad_norm parts vs union",
        steps[0].metrics["grad_norm"],
        steps[1].metrics["grad_norm"],
        tol.LOSS_ATOL,
        tol.GRAD_NORM_RTOL,
    )
    pair.close(
        "grad_norm parts vs reference",
        steps[0].metrics["grad_norm"],
        steps[2].metrics["grad_norm"],
        tol.LOSS_ATOL,
        tol.GRAD_NORM_RTOL,
    )
    probe = data[:3]
    after = [client.forward(probe, loss_fn, config).result() for client in (parts, union, reference)]
    pair.same_forward(
        "parts vs union after step",
        after[0],
        after[1],
        tol.LOGPROB_AFTER_STEP_ATOL,
        tol.LOSS_AFTER_STEP_RTOL,
        tol.LOSS_AFTER_STEP_ATOL,
    )
    pair.same_forward(
        "parts vs reference after step",
        after[0],
        after[2],
        tol.LOGPROB_AFTER_STEP_ATOL,
        tol.LOSS_AFTER_STEP_RTOL,
        tol.LOSS_AFTER_STEP_ATOL,
    )
    assert union_fb.loss is not None


@conformance_property(
    lora=cs.lora_configs,
    adam=lambda spec: cs.adam_params(),
    requests=lambda spec: st.lists(cs.loss_requests(spec, 3), min_size=1, max_size=3),
)
def prop_optim_step_matches_reference(pair: Pair, lora, adam, requests) -> None:
    """After k <= 3 steps: same step numbers, grad_norm, logprobs and saved LoRA tensors; the
    candidate's saved state, loaded on the reference, behaves as the reference's own session."""
    candidate, reference = pair.twins(lora)
    for loss_fn, data, config in requests:
        candidate.forward_backward(data, loss_fn, config), reference.forward_backward(data, loss_fn, config)
        got, expected = candidate.optim_step(adam).result(), reference.optim_step(adam).result()
        assert got.step == expected.step, f"step {got.step} != reference {expected.step}"
        pair.close(
            "grad_norm", got.metrics["grad_norm"], expected.metrics["grad_norm"], tol.LOSS_ATOL, tol.GRAD_NORM_RTOL
        )
    probe_loss, probe, probe_config = requests[0]
    expected_after = reference.forward(probe, probe_loss, probe_config).result()
    pair.same_forward(
        "after steps",
        candidate.forward(probe, probe_loss, probe_config).result(),
        expected_after,
        tol.LOGPROB_AFTER_STEP_ATOL,
        tol.LOSS_AFTER_STEP_RTOL,
        tol.LOSS_AFTER_STEP_ATOL,
    )
    got_path, expected_path = (
        candidate.save_state(pair.name("opt-c")).result().path,
        reference.save_state(pair.name("opt-r")).result().path,
    )
    got_w, expected_w = pair.saved_weights(got_path), pair.saved_weights(expected_path)
    assert got_w.keys() == expected_w.keys(), f"LoRA tensors {sorted(got_w)} != reference {sorted(expected_w)}"
    for name, e in expected_w.items():
        g = got_w[name].astype(np.float64)
        assert g.shape == e.shape, f"{name}: shape {g.shape} != reference {e.shape}"
        error_in_steps = np.abs(g - e) / (adam.learning_rate * len(requests))
        pair.close(
            f"{name} error / (lr·k), {1 - tol.WEIGHT_OUTLIER_FRACTION:.1%} quantile",
            np.quantile(error_in_steps, 1 - tol.WEIGHT_OUTLIER_FRACTION),
            0.0,
            tol.WEIGHT_ATOL_PER_LR,
        )
    loaded = pair.reference.create_training_client_from_state_with_optimizer(got_path)
    assert loaded.get_info().step == len(requests), f"loaded step {loaded.get_info().step}"
    pair.same_forward(
        "candidate state on reference",
        loaded.forward(probe, probe_loss, probe_config).result(),
        expected_after,
        tol.LOGPROB_AFTER_STEP_ATOL,
        tol.LOSS_AFTER_STEP_RTOL,
        tol.LOSS_AFTER_STEP_ATOL,
    )


@conformance_property(
    lora=cs.lora_configs, request=lambda spec: cs.loss_requests(spec, 4), adam=lambda spec: cs.adam_params()
)
def prop_train_equals_forward_backward_then_optim_step(pair: Pair, lora, request, adam) -> None:
    """train(data, loss_fn, lr, ...) = forward_backward(data) + optim_step(AdamParams(lr, ...)) on the candidate."""
    loss_fn, data, config = request
    one, two = pair.session(lora), pair.session(lora)
    kwargs = {train_name: getattr(adam, field) for field, train_name in _ADAM_TRAIN_KWARGS.items()}
    trained = one.train(data, loss_fn, adam.learning_rate, loss_fn_config=config, **kwargs)
    fb = two.forward_backward(data, loss_fn, config).result()
    step = two.optim_step(adam).result()
    assert trained.step == step.step == 1, f"train step {trained.step}, optim_step step {step.step}"
    pair.close("train loss", trained.loss, fb.loss, tol.LOSS_ATOL, tol.LOSS_RTOL)
    pair.close(
        "train grad_norm", trained.metrics["grad_norm"], step.metrics["grad_norm"], tol.LOSS_ATOL, tol.GRAD_NORM_RTOL
    )
    pair.same_forward(
        "after train vs after fb+step",
        one.forward(data, loss_fn, config).result(),
        two.forward(data, loss_fn, config).result(),
        tol.LOGPROB_ATOL,
        tol.LOSS_RTOL,
        tol.LOSS_ATOL,
    )
    assert len(trained.loss_fn_outputs) == len(data), "train returned no per-datum outputs"


@conformance_property(lora=cs.lora_configs, data=lambda spec: cs.datum_batches(spec, "cross_entropy", 3))
def prop_forward_accumulates_nothing(pair: Pair, lora, data) -> None:
    """forward (L8) adds no gradient: forward then optim_step leaves logprobs as they were (step 1, grad_norm 0)."""
    client = pair.session(lora)
    before = client.forward(data).result()
    step = client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert step.step == 1, f"step {step.step}"
    pair.close("grad_norm after forward only", step.metrics["grad_norm"], 0.0, tol.EXACT)
    pair.same_forward("after empty step", client.forward(data).result(), before, tol.EXACT, tol.EXACT, tol.EXACT)
