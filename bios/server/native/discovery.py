"""Health, engine counters, capabilities and tokenizers: what a client asks before it works."""

from __future__ import annotations

from fastapi import APIRouter

from bios.server.state import OwnerDep, ServiceDep
from bios.types import ServerCapabilities

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/v1/stats")
def stats(who: OwnerDep, service: ServiceDep) -> dict:
    """Engine counters: backend calls made and jobs (requests) they ran, since start."""
    scheduler = service.engine.scheduler
    return {
        "backend_calls": scheduler.backend_calls,
        "jobs_run": scheduler.jobs_run,
        "retried_attempts_by_status": {str(k): v for k, v in sorted(service.notices_served.items())},
    }


@router.get("/v1/capabilities", response_model=None)
def capabilities(who: OwnerDep, service: ServiceDep) -> ServerCapabilities:
    return service.engine.capabilities()


@router.get("/v1/tokenizers/{base_model:path}")
def tokenizer(base_model: str, who: OwnerDep, service: ServiceDep) -> dict:
    """The base model's tokenizer as `{"tokenizer_json", "config", "name_or_path"}`."""
    return service.engine.tokenizer(base_model).to_wire()
