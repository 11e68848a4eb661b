"""Health, the caller's figures (stats and usage), capabilities and tokenizers."""

from __future__ import annotations

from fastapi import APIRouter

from bios.server.state import KeysDep, OwnerDep, ServiceDep
from bios.types import ServerCapabilities

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/v1/stats")
def stats(who: OwnerDep, service: ServiceDep, keys: KeysDep) -> dict:
    """The caller's own figures: its finished requests by kind and status, its usage (as
    `/v1/usage`) and the polls of its requests answered with a retried failure, by status.
    An operator key also gets `server`: the same over every key, and the engine's counters
    (backend calls made and jobs they ran, since start)."""
    figures: dict = {
        "owner": who,
        "requests": service.ledger.requests(who),
        "usage": service.usage(who),
        "retried_attempts_by_status": service.retried_attempts(who),
    }
    if keys.is_operator(who):
        scheduler = service.engine.scheduler
        figures["server"] = {
            "requests": service.ledger.requests(None),
            "usage": service.ledger.usage(None).to_dict(),
            "retried_attempts_by_status": service.retried_attempts(None),
            "backend_calls": scheduler.backend_calls,
            "jobs_run": scheduler.jobs_run,
        }
    return figures


@router.get("/v1/usage")
def usage(who: OwnerDep, service: ServiceDep) -> dict[str, int]:
    """What the caller's key has used, counted durably: tokens trained, prefilled and sampled,
    optimizer steps and checkpoints saved, and the checkpoints it holds now (count, bytes)."""
    return service.usage(who)


@router.get("/v1/capabilities", response_model=None)
def capabilities(who: OwnerDep, service: ServiceDep) -> ServerCapabilities:
    return service.engine.capabilities()


@router.get("/v1/tokenizers/{base_model:path}")
def tokenizer(base_model: str, who: OwnerDep, service: ServiceDep) -> dict:
    """The base model's tokenizer as `{"tokenizer_json", "config", "name_or_path"}`."""
    return service.engine.tokenizer(base_model).to_wire()
