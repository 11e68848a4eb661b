"""Listing and deleting the caller's checkpoints."""

from __future__ import annotations

from fastapi import APIRouter

from bios.server.state import OwnerDep, ServiceDep
from bios.types import StateResult

router = APIRouter()


@router.get("/v1/checkpoints", response_model=list[StateResult])
def list_checkpoints(who: OwnerDep, service: ServiceDep, session_id: str | None = None) -> list[StateResult]:
    if session_id is not None:
        service.check_session(who, session_id)
    return service.list_checkpoints(who, session_id)


@router.delete("/v1/checkpoints")
def delete_checkpoint(path: str, who: OwnerDep, service: ServiceDep) -> dict:
    service.delete_checkpoint(who, path)
    return {}
