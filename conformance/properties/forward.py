"""Forward passes: per-token logprobs and every built-in loss (docs/losses.md L0–L5), and
`SamplingClient.compute_logprobs` against `forward` (S2)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from bios import types
from conformance import strategies as cs
from conformance import tolerances as tol
from conformance.harness import Pair, datum, logprobs
from conformance.properties import conformance_property


def _warm_up(pair: Pair, clients: tuple, data: list) -> None:
    """One identical cross-entropy step on each client, so that B != 0 and every LoRA factor counts."""
    for client in clients:
        client.train(data, learning_rate=1e-2)


@conformance_property(
    lora=cs.lora_configs, request=cs.loss_requests, warm=lambda spec: cs.datum_batches(spec, "cross_entropy", 2, 17)
)
def prop_forward_matches_reference(pair: Pair, lora, request, warm) -> None:
    """forward and forward_backward give the reference's loss, logprobs [T_i] and elementwise losses."""
    loss_fn, data, config = request
    candidate, reference = pair.twins(lora)
    _warm_up(pair, (candidate, reference), warm)
    expected = reference.forward(data, loss_fn, config).result()
    got = candidate.forward(data, loss_fn, config).result()
    pair.same_forward(
        f"{loss_fn} forward",
        got,
        expected,
        tol.LOGPROB_ATOL,
        tol.LOSS_RTOL,
        tol.LOSS_ATOL,
        (tol.ELEMENTWISE_ATOL, tol.ELEMENTWISE_RTOL),
    )
    got_fb = candidate.forward_backward(data, loss_fn, config).result()
    pair.same_forward(
        f"{loss_fn} forward_backward",
        got_fb,
        expected,
        tol.LOGPROB_ATOL,
        tol.LOSS_RTOL,
        tol.LOSS_ATOL,
        (tol.ELEMENTWISE_ATOL, tol.ELEMENTWISE_RTOL),
    )
    assert np.isclose(got.metrics.get("loss:sum", got.loss), got.loss), "metric loss:sum differs from loss"


@conformance_property(
    lora=cs.lora_configs,
    warm=lambda spec: cs.datum_batches(spec, "cross_entropy", 2, 17),
    prompt=lambda spec: cs.prompts(spec, 40),
)
def prop_compute_logprobs_equals_forward(pair: Pair, lora, warm, prompt) -> None:
    """SamplingClient.compute_logprobs(prompt) [P] is [None, forward logprobs...] and matches the reference."""
    candidate, reference = pair.twins(lora)
    _warm_up(pair, (candidate, reference), warm)
    sampler = candidate.save_weights_and_get_sampling_client(pair.name("lp"))
    got = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    assert len(got) == len(prompt) and got[0] is None, f"compute_logprobs gave {len(got)} entries, first {got[0]!r}"
    if len(prompt) < 2:
        return
    forward = logprobs(candidate.forward([datum(prompt)]).result())[0]
    pair.close("compute_logprobs vs own forward", np.asarray(got[1:], dtype=np.float64), forward, tol.LOGPROB_ATOL)
    expected = logprobs(reference.forward([datum(prompt)]).result())[0]
    pair.close("compute_logprobs vs reference", np.asarray(got[1:], dtype=np.float64), expected, tol.LOGPROB_ATOL)


@conformance_property(
    lora=cs.lora_configs,
    loss=lambda spec: cs.custom_losses(),
    data=lambda spec: cs.datum_batches(spec, "cross_entropy", 3, 33),
    lr=lambda spec: st.floats(1e-3, 1e-2),
)
def prop_custom_loss_matches_reference(pair: Pair, lora, loss, data, lr) -> None:
    """forward_backward_custom gives the reference's loss and, after optim_step, its logprobs (L7)."""
    candidate, reference = pair.twins(lora)
    expected = reference.forward_backward_custom(data, loss).result()
    got = candidate.forward_backward_custom(data, loss).result()
    pair.close("custom loss", got.loss, expected.loss, tol.LOSS_ATOL, tol.LOSS_RTOL)
    e_step = reference.optim_step(types.AdamParams(learning_rate=lr)).result()
    g_step = candidate.optim_step(types.AdamParams(learning_rate=lr)).result()
    pair.close(
        "custom loss grad_norm",
        g_step.metrics["grad_norm"],
        e_step.metrics["grad_norm"],
        tol.LOSS_ATOL,
        tol.GRAD_NORM_RTOL,
    )
    after_e, after_g = reference.forward(data).result(), candidate.forward(data).result()
    pair.same_forward(
        "after custom step",
        after_g,
        after_e,
        tol.LOGPROB_AFTER_STEP_ATOL,
        tol.LOSS_AFTER_STEP_RTOL,
        tol.LOSS_AFTER_STEP_ATOL,
    )
