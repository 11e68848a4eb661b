"""Bringing a restarted `bios serve` back to what it last acknowledged, and on to finish what
it had accepted.

For every session in the database: its adapter is restored from the journal (the state of its
last acknowledged change); a change written to the journal whose answer was not yet committed
is acknowledged now with the answer written beside it; then the session's requests after that
state are submitted again in their order, at their own sequence numbers: the gradients of
acknowledged `forward_backward` requests are applied again, and every Tinker request still
pending is run again from its stored body under its own request id (`resume`), so the SDK's
polls simply wait for it and the run's weights end as if nothing had happened. A native
request still pending is answered with a retryable error, having changed nothing; its client
submits it again at the same number, which stays open for it, as does a Tinker number no
request had reached yet (the SDK retries that POST). Other numbers are released.

Pending requests of no restored session are run again too (a Tinker run's creation), or
answered so that the client submits them anew: a Tinker sample with 410 (the SDK's sampling
client resubmits it), a native one with the retryable error. Sampling clients of the native
API are served again under their ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bios import wire
from bios.errors import APIConnectionError, BiosError
from bios.server.db import RequestRow
from bios.server.journal import Entry
from bios.server.service import Service, encode_error

RESTARTED = "the server restarted before this request finished; nothing of it was applied, so submit it again"

Resume = Callable[[RequestRow], bool]
"""Runs a pending Tinker request again under its id (True), or answers it (False): `Tinker.resume`."""


@dataclass
class Recovered:
    """What `recover` did: sessions and samplers restored, answers completed from the journal,
    gradients re-applied, requests run again, and requests answered for their clients to
    submit anew."""

    sessions: int = 0
    samplers: int = 0
    completed: int = 0
    replayed: int = 0
    resumed: int = 0
    interrupted: int = 0


def recover(service: Service, resume: Resume) -> Recovered:
    """Restore every session of `service.records` on `service.engine`, and run again or answer
    every request left pending (see the module doc); `resume` runs a Tinker request again."""
    done = Recovered()
    restored = set()
    for session_id, owner, _base_model, _created in service.records.sessions_of(None):
        entry = service.journal.read(session_id)
        if entry is None:  # the server died while creating it: it was never acknowledged
            continue
        _restore_session(service, resume, session_id, owner, entry, done)
        restored.add(session_id)
    for row in service.records.pending_requests():
        if row.session_id not in restored:
            _run_again_or_answer(service, resume, row, done)
    for sampler_id, owner, base_model, model_path in service.records.all_samplers():
        try:
            service.engine.create_sampler(
                model_path=model_path, base_model=None if model_path else base_model, sampler_id=sampler_id
            )
        except BiosError:  # its checkpoint or model is gone: so is the sampler
            service.records.remove_sampler(sampler_id)
            continue
        service.add_sampler(sampler_id, owner)
        done.samplers += 1
    return done


def _restore_session(
    service: Service, resume: Resume, session_id: str, owner: str, entry: Entry, done: Recovered
) -> None:
    """Reopen one session at its journal `entry` and submit again, in order, what came after it."""
    rows = service.records.session_requests(session_id)
    pending = {row.seq: row for row in rows if row.status == "pending" and row.seq is not None and row.seq > entry.seq}
    for row in rows:
        if row.status != "pending" or (row.seq is not None and pending.get(row.seq) is row):
            continue
        if row.request_id == entry.request_id and entry.answer is not None:
            service.records.finish_requests([(row.request_id, "done", entry.answer)])
            done.completed += 1
        else:  # it came before the journal's state (or has no number): it cannot run again
            service.answer_now(row, encode_error(APIConnectionError(RESTARTED)))
            done.interrupted += 1
    service.engine.reopen_session(
        entry.state, next_seq=entry.seq + 1, user_metadata=service.records.session_metadata(session_id)
    )
    service.adopt_session(session_id, owner)
    tinker = any(row.kind.startswith("tinker.") for row in rows)
    replays = {
        row.seq: row.replay
        for row in rows
        if row.replay is not None and row.status == "done" and row.seq is not None and row.seq > entry.seq
    }
    seen = {row.seq for row in rows}
    last_seq = max((row.seq for row in rows if row.seq is not None), default=entry.seq)
    for seq in range(entry.seq + 1, last_seq + 1):
        if seq in replays:
            body = wire.ForwardBackward.model_validate_json(replays[seq])
            service.engine.forward_backward(
                session_id, seq, body.data, body.loss_fn, body.loss_fn_config, backward=True
            )
            done.replayed += 1
        elif seq in pending:
            _run_again_or_answer(service, resume, pending[seq], done)
        elif seq in seen or not tinker:  # a native number no request holds was given up by `skip`
            service.engine.skip(session_id, seq)
    done.sessions += 1


def _run_again_or_answer(service: Service, resume: Resume, row: RequestRow, done: Recovered) -> None:
    """A pending Tinker request is run again (or answered) by `resume`; a native one is answered
    with a retryable error, its sequence number left open for the client's retry."""
    if row.kind.startswith("tinker."):
        if resume(row):
            done.resumed += 1
            return
    else:
        service.answer_now(row, encode_error(APIConnectionError(RESTARTED)))
    done.interrupted += 1
