"""Training sessions: create (fresh or from a checkpoint), inspect, close, and their sequence
numbers (the next free one; giving one up with `skip`)."""

from __future__ import annotations

from fastapi import APIRouter

from bios import wire
from bios.errors import InvalidRequestError
from bios.server.service import Service
from bios.server.state import OwnerDep, ServiceDep
from bios.types import TrainingInfo

router = APIRouter()


def _opened(service: Service, who: str, info: TrainingInfo) -> TrainingInfo:
    """`info` of a session the engine just created, filed under `who` (with its user
    metadata) and made durable."""
    service.add_session(info.session_id, who, info.base_model, info.user_metadata)
    return info


@router.post("/v1/sessions", response_model=TrainingInfo)
def create_session(body: wire.CreateSession, who: OwnerDep, service: ServiceDep) -> TrainingInfo:
    return _opened(service, who, service.engine.create_session(body.base_model, body.lora_config, body.user_metadata))


@router.post("/v1/sessions/from_state", response_model=TrainingInfo)
def session_from_state(body: wire.SessionFromState, who: OwnerDep, service: ServiceDep) -> TrainingInfo:
    if not body.path.startswith("bios://"):
        raise InvalidRequestError(
            f"path {body.path!r}: a server resumes only from its own checkpoints (bios://SESSION/weights/NAME); "
            "load a local PEFT adapter with an in-process client",
            field="path",
        )
    service.readable_checkpoint(who, body.path)
    engine = service.engine
    info = engine.create_session_from_state(
        body.path, body.base_model, optimizer=body.optimizer, user_metadata=body.user_metadata
    )
    return _opened(service, who, info)


@router.get("/v1/sessions", response_model=list[TrainingInfo])
def list_sessions(who: OwnerDep, service: ServiceDep) -> list[TrainingInfo]:
    """The caller's open sessions, oldest first."""
    return service.list_sessions(who)


@router.get("/v1/sessions/{session_id}", response_model=TrainingInfo)
def session_info(session_id: str, who: OwnerDep, service: ServiceDep) -> TrainingInfo:
    return service.engine.session_info(service.check_session(who, session_id))


@router.delete("/v1/sessions/{session_id}")
def close_session(session_id: str, who: OwnerDep, service: ServiceDep) -> dict:
    service.close_session(who, session_id)
    return {}


@router.get("/v1/sessions/{session_id}/next_seq")
def next_seq(session_id: str, who: OwnerDep, service: ServiceDep) -> wire.NextSeq:
    return wire.NextSeq(next_seq=service.engine.next_seq(service.check_session(who, session_id)))


@router.post("/v1/sessions/{session_id}/skip")
def skip(session_id: str, body: wire.Ordered, who: OwnerDep, service: ServiceDep) -> dict:
    service.engine.skip(service.check_session(who, session_id), body.seq)
    return {}
