"""The ordered requests of a training session: forward(/backward), optimizer steps, sampling,
saving and loading state.

Each carries the session's sequence number `seq` (the engine runs a session's requests in
that order) and may carry an `Idempotency-Key` header (a retry gets the first request back).
A request that changes the adapter (`optim_step`, `load_state`) is answered only once its new
state is in the journal; a gradient (`forward_backward` with backward) keeps its body so that
a restart can apply it again.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter
from fastapi.responses import Response

from bios import wire
from bios.engine.engine import WithState
from bios.server import ledger
from bios.server.ledger import Usage
from bios.server.native.requests import submitted
from bios.server.service import Recorder, Service, encode_result
from bios.server.state import OwnerDep, ServiceDep, Submission, SubmissionDep

router = APIRouter()

R = TypeVar("R")


def _submit(
    service: Service,
    who: str,
    how: Submission,
    kind: str,
    session_id: str,
    body: wire.Ordered,
    start: Callable[[], concurrent.futures.Future[R]],
    *,
    record: Recorder[R] | None = None,
    replay: bytes | None = None,
    encode: Callable[[R], bytes] = encode_result,
    meter: Callable[[R], Usage] = ledger.nothing,
) -> Response:
    """`who`'s request `kind` at `body.seq` of session `session_id` (NotFoundError if it is not
    `who`'s), started with `start()` unless its idempotency key names an earlier one
    (`Service.submit`), its usage in the ledger by `meter`; answered as `how` asks (`submitted`)."""
    service.check_session(who, session_id)
    raw = body.model_dump_json().encode()
    request_id = service.submit(
        who,
        kind,
        raw,
        how.key,
        start,
        session_id=session_id,
        seq=body.seq,
        record=record,
        replay=replay,
        encode=encode,
        bill=service.session_bill(session_id, meter),
    )
    return submitted(service, who, request_id, how)


def _changed(done: WithState[Any]) -> bytes:
    """The `done` envelope of an adapter change run with its state exported: its result, not the state."""
    return encode_result(done.result)


@router.post("/v1/sessions/{session_id}/forward_backward", response_model=wire.Submitted)
def forward_backward(
    session_id: str, body: wire.ForwardBackward, who: OwnerDep, service: ServiceDep, how: SubmissionDep
) -> Response:
    start = lambda: service.engine.forward_backward(
        session_id, body.seq, body.data, body.loss_fn, body.loss_fn_config, backward=body.backward
    )
    replay = body.model_dump_json().encode() if body.backward else None
    meter = ledger.trained(body.data)
    return _submit(service, who, how, "forward_backward", session_id, body, start, replay=replay, meter=meter)


@router.post("/v1/sessions/{session_id}/optim_step", response_model=wire.Submitted)
def optim_step(
    session_id: str, body: wire.OptimStep, who: OwnerDep, service: ServiceDep, how: SubmissionDep
) -> Response:
    start = lambda: service.engine.optim_step_and_export(
        session_id, body.seq, body.adam_params, after_forward=body.after_forward
    )
    record = service.durable_recorder(session_id, body.seq)
    return _submit(
        service, who, how, "optim_step", session_id, body, start, record=record, encode=_changed, meter=ledger.step
    )


@router.post("/v1/sessions/{session_id}/sample", response_model=wire.Submitted)
def session_sample(
    session_id: str, body: wire.SessionSample, who: OwnerDep, service: ServiceDep, how: SubmissionDep
) -> Response:
    start = lambda: service.engine.sample(session_id, body.seq, body.prompt, body.sampling_params, body.num_samples)
    return _submit(service, who, how, "sample", session_id, body, start, meter=ledger.sampled(body.prompt))


@router.post("/v1/sessions/{session_id}/save_state", response_model=wire.Submitted)
def save_state(
    session_id: str, body: wire.SaveState, who: OwnerDep, service: ServiceDep, how: SubmissionDep
) -> Response:
    start = lambda: service.engine.save_state(
        session_id, body.seq, body.name, body.metadata, body.kind, ttl_seconds=body.ttl_seconds, merged=body.merged
    )
    record = service.checkpoint_recorder(who, session_id)
    return _submit(service, who, how, "save_state", session_id, body, start, record=record, meter=ledger.saved)


@router.post("/v1/sessions/{session_id}/load_state", response_model=wire.Submitted)
def load_state(
    session_id: str, body: wire.LoadState, who: OwnerDep, service: ServiceDep, how: SubmissionDep
) -> Response:
    service.check_session(who, session_id)
    service.readable_checkpoint(who, body.path)
    start = lambda: service.engine.load_state_and_export(session_id, body.seq, body.path, optimizer=body.optimizer)
    record = service.durable_recorder(session_id, body.seq)
    return _submit(service, who, how, "load_state", session_id, body, start, record=record, encode=_changed)
