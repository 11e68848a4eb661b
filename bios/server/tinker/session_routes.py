"""Handshake, sessions, telemetry, capabilities and the long-polled `retrieve_future`.

Trivial routes and the long-poll are coroutines: they never wait for a worker thread.
"""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from bios.server.native.discovery import healthz
from bios.server.tinker import answers
from bios.server.tinker.bodies import CreateSession, Retrieve, SessionRef, user_metadata
from bios.server.tinker.context import TinkerDep, TinkerOwnerDep

HOLD_S = 30.0
"""How long a `retrieve_future` poll waits for its answer before answering 408 (the SDK gives
up on a poll after 45 s and re-polls at once after a 408)."""

CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "sample_join_sampling_session": False,
    "custom_loss_server_side": False,
    "create_model_via_load_weights": True,
}
"""The SDK features Bios serves: no JWT exchange, session poller, sampler joining or server-side
custom losses; models are created from a checkpoint in one `load_weights` request."""

router = APIRouter()
router.get("/healthz")(healthz)


@router.post("/client/config")
async def client_config(who: TinkerOwnerDep) -> dict:
    return CLIENT_CONFIG


@router.post("/client/dynamic_config")
async def dynamic_config(who: TinkerOwnerDep) -> dict:
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.post("/create_session")
def create_session(body: CreateSession, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    session_id = tinker.sessions.create(who, user_metadata(body.user_metadata), body.display_name)
    return {"type": "create_session", "session_id": session_id}


@router.get("/sessions")
def list_sessions(
    who: TinkerOwnerDep, tinker: TinkerDep, limit: int = Query(20, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> dict:
    """The caller's session ids, oldest first (`RestClient.list_sessions`)."""
    return {"sessions": tinker.session_ids(who)[offset : offset + limit]}


@router.get("/sessions/{session_id}")
def get_session(session_id: str, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """The session's training runs (every one it created), live sampling sessions, user
    metadata and display name (`RestClient.get_session`)."""
    facts = tinker.sessions.facts(who, session_id)
    return {
        "training_run_ids": [run.model_id for run in tinker.runs.of_tinker_session(who, session_id)],
        "sampler_ids": facts.sampler_ids,
        "user_metadata": facts.user_metadata,
        "display_name": facts.display_name,
    }


@router.post("/session_heartbeat")
def session_heartbeat(body: SessionRef, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """410 once the session has finished or expired: the SDK then stops heartbeating."""
    tinker.sessions.heartbeat(who, body.session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    tinker.sessions.finish(who, session_id)
    return {}


@router.post("/telemetry")
async def telemetry(who: TinkerOwnerDep) -> dict:
    """Accepted and not kept (0.33.x SDKs resend a refused batch every second, forever)."""
    return {"status": "accepted"}


@router.get("/get_server_capabilities")
def server_capabilities(who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    models = tinker.engine.capabilities().supported_models
    return {
        "supported_models": [
            {"model_name": m.model_name, "max_context_length": m.max_seq_len, "trainable": True, "sampleable": True}
            for m in models
        ]
    }


@router.post("/retrieve_future")
async def retrieve_future(body: Retrieve, who: TinkerOwnerDep, tinker: TinkerDep) -> Response:
    """The request's result (protobuf or JSON) or failure `{"error", "category"}`, waiting up
    to HOLD_S for it; 408 `try_again` while it runs; 404 for another key's request."""
    stored = await tinker.service.wait(who, body.request_id, HOLD_S)
    if stored is None:
        return JSONResponse(
            {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}, status_code=408
        )
    return answers.served(body.request_id, stored)
