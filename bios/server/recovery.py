"""Bringing a restarted `bios serve` back to what it last acknowledged.

For every session in the database: its adapter is restored from the journal (the state of its
last acknowledged change); a change written to the journal whose answer was not yet committed
is acknowledged now with the answer written beside it; the gradients of acknowledged
`forward_backward` requests made after that state are applied again in their order; every
other request that was still running is answered with a retryable error, having changed
nothing. The session then takes requests numbered after the last one it had seen, except
that the numbers of interrupted native requests stay open for the clients' retries (a Tinker
client never resubmits a failed request, so its numbers are released). Sampling clients of
the native API are served again under their ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from bios import wire
from bios.errors import APIConnectionError, BiosError
from bios.server.service import Service, encode_error

RESTARTED = "the server restarted before this request finished; nothing of it was applied, so submit it again"


@dataclass
class Recovered:
    """What `recover` did: sessions and samplers restored, answers completed from the journal,
    gradients re-applied, and requests failed as interrupted."""

    sessions: int = 0
    samplers: int = 0
    completed: int = 0
    replayed: int = 0
    interrupted: int = 0


def recover(service: Service) -> Recovered:
    """Restore every session of `service.records` on `service.engine` (see the module doc)."""
    done = Recovered()
    interrupted = encode_error(APIConnectionError(RESTARTED))
    for session_id, owner, _base_model, _created in service.records.sessions_of(None):
        entry = service.journal.read(session_id)
        if entry is None:  # the server died while creating it: it was never acknowledged
            continue
        rows = service.records.session_requests(session_id)
        finished: list[tuple[str, str, bytes]] = []
        resubmittable = set()
        for row in rows:
            if row.status != "pending":
                continue
            if row.request_id == entry.request_id and entry.answer is not None:
                finished.append((row.request_id, "done", entry.answer))
                done.completed += 1
            else:
                finished.append((row.request_id, "error", interrupted))
                done.interrupted += 1
                if not row.kind.startswith("tinker."):  # bios clients retry it at the same number
                    resubmittable.add(row.seq)
        service.records.finish_requests(finished)
        service.engine.reopen_session(entry.state, next_seq=entry.seq + 1)
        service.adopt_session(session_id, owner)
        replays = {
            row.seq: row.replay
            for row in rows
            if row.replay is not None and row.status == "done" and row.seq is not None and row.seq > entry.seq
        }
        last_seq = max((row.seq for row in rows if row.seq is not None), default=entry.seq)
        for seq in range(entry.seq + 1, last_seq + 1):
            if seq in replays:
                body = wire.ForwardBackward.model_validate_json(replays[seq])
                service.engine.forward_backward(
                    session_id, seq, body.data, body.loss_fn, body.loss_fn_config, backward=True
                )
                done.replayed += 1
            elif seq not in resubmittable:  # an interrupted request's number waits for its retry
                service.engine.skip(session_id, seq)
        done.sessions += 1
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
