"""The caller's checkpoints: listing, deleting, what they hold, publishing, their time to live,
and the download URLs of external weights."""

from __future__ import annotations

from fastapi import APIRouter, Request

from bios import wire
from bios.server.downloads import external_weights_urls
from bios.server.state import OwnerDep, ServerStateDep, ServiceDep
from bios.types import ExternalWeightsUrls, StateResult, WeightsInfo

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


@router.get("/v1/checkpoints/info", response_model=WeightsInfo)
def checkpoint_info(path: str, who: OwnerDep, service: ServiceDep) -> WeightsInfo:
    return service.engine.checkpoint_info(service.readable_checkpoint(who, path))


@router.post("/v1/checkpoints/publish", response_model=StateResult)
def publish_checkpoint(path: str, who: OwnerDep, service: ServiceDep) -> StateResult:
    return service.publish_checkpoint(who, path, public=True)


@router.delete("/v1/checkpoints/publish", response_model=StateResult)
def unpublish_checkpoint(path: str, who: OwnerDep, service: ServiceDep) -> StateResult:
    return service.publish_checkpoint(who, path, public=False)


@router.put("/v1/checkpoints/ttl", response_model=StateResult)
def set_checkpoint_ttl(body: wire.CheckpointTtl, who: OwnerDep, service: ServiceDep) -> StateResult:
    return service.set_checkpoint_ttl(who, body.path, body.ttl_seconds)


@router.get("/v1/checkpoints/external_weights_urls", response_model=ExternalWeightsUrls)
def get_external_weights_urls(path: str, request: Request, who: OwnerDep, state: ServerStateDep) -> ExternalWeightsUrls:
    return external_weights_urls(state.service, state.signer, request, who, path)
