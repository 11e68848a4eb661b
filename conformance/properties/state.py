"""Checkpoints: save_state/load_state round trips on the candidate are exact and training
continues identically; a state saved by the candidate loads on the reference and vice versa."""

from __future__ import annotations

from hypothesis import strategies as st

from bios import types
from conformance import strategies as cs
from conformance import tolerances as tol
from conformance.harness import Pair
from conformance.properties import conformance_property

_CE = lambda spec: cs.datum_batches(spec, "cross_entropy", 3, 33)


@conformance_property(
    lora=cs.lora_configs, data=_CE, adam=lambda spec: cs.adam_params(), steps=lambda spec: st.integers(1, 3)
)
def prop_save_load_round_trip_is_exact(pair: Pair, lora, data, adam, steps) -> None:
    """After save_state, load_state_with_optimizer (into another session) and
    create_training_client_from_state_with_optimizer give bit-identical logprobs, the same step,
    and one more step stays bit-identical (moments restored). The plain load_state and
    create_training_client_from_state restore the same weights at step 0."""
    origin = pair.session(lora)
    for _ in range(steps):
        origin.forward_backward(data)
        origin.optim_step(adam)
    path = origin.save_state(pair.name("rt"), metadata={"steps": steps}).result().path
    loaded = pair.session(
        types.LoraConfig(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules, seed=lora.seed + 1)
    ).load_state_with_optimizer(path)
    resumed = pair.candidate.create_training_client_from_state_with_optimizer(path)
    expected = origin.forward(data).result()
    weights_only = (
        (pair.session(lora).load_state(path), "load_state", 0),
        (pair.candidate.create_training_client_from_state(path), "create_training_client_from_state", 0),
    )
    for client, where, step in ((loaded, "load_state", steps), (resumed, "from_state", steps), *weights_only):
        assert client.get_info().step == step, f"{where}: step {client.get_info().step}, expected {step}"
        pair.same_forward(f"{where} logprobs", client.forward(data).result(), expected, tol.EXACT, tol.EXACT, tol.EXACT)
    results = [
        client.train(data, learning_rate=adam.learning_rate, beta1=adam.beta1, beta2=adam.beta2, eps=adam.eps)
        for client in (origin, loaded, resumed)
    ]
    assert {r.step for r in results} == {steps + 1}, f"steps after resuming: {[r.step for r in results]}"
    after = [client.forward(data).result() for client in (origin, loaded, resumed)]
    for other, where in ((after[1], "load_state_with_optimizer"), (after[2], "from_state_with_optimizer")):
        pair.same_forward(f"{where} after one more step", other, after[0], tol.EXACT, tol.EXACT, tol.EXACT)


@conformance_property(
    lora=cs.lora_configs, data=_CE, adam=lambda spec: cs.adam_params(), steps=lambda spec: st.integers(1, 2)
)
def prop_state_crosses_between_backends(pair: Pair, lora, data, adam, steps) -> None:
    """A state the candidate saves loads on the reference (same logprobs, step, next step) and a
    state the reference saves loads on the candidate."""
    candidate = pair.session(lora)
    for _ in range(steps):
        candidate.forward_backward(data)
        candidate.optim_step(adam)
    on_reference = pair.reference.create_training_client_from_state_with_optimizer(
        candidate.save_state(pair.name("x-c")).result().path
    )
    assert on_reference.get_info().step == steps, f"reference loaded step {on_reference.get_info().step}, saved {steps}"
    pair.same_forward(
        "candidate state on reference",
        candidate.forward(data).result(),
        on_reference.forward(data).result(),
        tol.LOGPROB_ATOL,
        tol.LOSS_RTOL,
        tol.LOSS_ATOL,
    )
    got = candidate.train(data, learning_rate=adam.learning_rate, beta1=adam.beta1, beta2=adam.beta2, eps=adam.eps)
    expected = on_reference.train(
        data, learning_rate=adam.learning_rate, beta1=adam.beta1, beta2=adam.beta2, eps=adam.eps
    )
    assert got.step == expected.step == steps + 1, f"steps {got.step}, {expected.step}"
    pair.close("loss of the step after the crossing", got.loss, expected.loss, tol.LOSS_ATOL, tol.LOSS_RTOL)
    pair.close(
        "grad_norm after the crossing",
        got.metrics["grad_norm"],
        expected.metrics["grad_norm"],
        tol.LOSS_ATOL,
        tol.GRAD_NORM_RTOL,
    )
    back = pair.candidate.create_training_client_from_state_with_optimizer(
        on_reference.save_state(pair.name("x-r")).result().path
    )
    assert back.get_info().step == steps + 1, f"candidate loaded step {back.get_info().step}"
    pair.same_forward(
        "reference state on candidate",
        back.forward(data).result(),
        on_reference.forward(data).result(),
        tol.LOGPROB_AFTER_STEP_ATOL,
        tol.LOSS_AFTER_STEP_RTOL,
        tol.LOSS_AFTER_STEP_ATOL,
    )
