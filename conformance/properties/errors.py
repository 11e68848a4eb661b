"""Bad input: the candidate rejects each invalid request with the reference's bios error class,
naming the field, and the rejected request changes nothing (README, "Errors")."""

from __future__ import annotations

from conformance import strategies as cs
from conformance import tolerances as tol
from conformance.harness import Pair
from conformance.properties import conformance_property


def _raised(submit, client) -> BaseException | None:
    try:
        submit(client)
    except Exception as exc:  # noqa: BLE001 - the error is what is compared
        return exc
    return None


@conformance_property(
    lora=cs.lora_configs,
    bad=cs.bad_requests,
    data=lambda spec: cs.datum_batches(spec, "cross_entropy", 2, 17),
    adam=lambda spec: cs.adam_params(),
)
def prop_bad_input_rejected_like_reference_and_changes_nothing(pair: Pair, lora, bad, data, adam) -> None:
    """Same error class as the reference, the field named; with a gradient pending, the session
    then steps exactly like a twin that never saw the request."""
    seen, control, reference = pair.session(lora), pair.session(lora), pair.session(lora, "reference")
    for client in (seen, control, reference):
        client.forward_backward(data).result()
    expected = _raised(bad.submit, reference)
    assert type(expected) is bad.error, (
        f"the reference raised {type(expected).__name__}: {expected} (strategy expects {bad.error.__name__})"
    )
    got = _raised(bad.submit, seen)
    assert type(got) is type(expected), (
        f"{bad.label}: candidate raised {type(got).__name__}: {got}; reference {type(expected).__name__}"
    )
    where = f"{getattr(got, 'field', '')} {got}"
    assert bad.field in where, f"{bad.label}: error does not name {bad.field!r}: {where}"
    steps = [client.optim_step(adam).result() for client in (seen, control)]
    assert steps[0].step == steps[1].step == 1, f"steps {[s.step for s in steps]}"
    pair.close(
        "grad_norm after a rejected request", steps[0].metrics["grad_norm"], steps[1].metrics["grad_norm"], tol.EXACT
    )
    pair.same_forward(
        "after a rejected request",
        seen.forward(data).result(),
        control.forward(data).result(),
        tol.EXACT,
        tol.EXACT,
        tol.EXACT,
    )
