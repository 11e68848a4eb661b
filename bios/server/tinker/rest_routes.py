"""The RestClient's endpoints: training runs, checkpoints, weights info, archive downloads.

Everything listed is the caller's own: another key's runs and checkpoints are not found.
Only checkpoints of Tinker runs are listed (a native Bios session has no Tinker path).
"""

from __future__ import annotations

import datetime
import os

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from bios.errors import InvalidRequestError
from bios.server.downloads import external_weights_urls
from bios.server.tinker.archive import build_archive
from bios.server.tinker.bodies import CheckpointTtl, WeightsInfo
from bios.server.tinker.context import Tinker, TinkerDep, TinkerOwnerDep
from bios.server.tinker.ids import Run
from bios.types import StateResult
from bios.types.params import ATTENTION_MODULES, MLP_MODULES

CHECKPOINT_TYPES = {"state": "training", "sampler": "sampler", "external": "external"}

router = APIRouter()


def iso(timestamp: float) -> str:
    """Unix time as an ISO-8601 UTC datetime."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def _checkpoint(tinker: Tinker, record: StateResult) -> dict:
    """A checkpoint of a Tinker run as a Tinker `Checkpoint`."""
    path = tinker.runs.tinker_path(record.path)
    return {
        "checkpoint_id": path.split("/", 3)[3],
        "checkpoint_type": CHECKPOINT_TYPES[record.kind],
        "time": iso(record.created_at),
        "tinker_path": path,
        "size_bytes": record.size_bytes,
        "public": record.public,
        "user_metadata": {k: v if isinstance(v, str) else str(v) for k, v in record.metadata.items()},
    }


def _training_run(tinker: Tinker, who: str, run: Run) -> dict:
    """The run as a Tinker `TrainingRun`; its last request time is the latest activity on
    record (its creation or its newest checkpoint)."""
    saved = tinker.service.list_checkpoints(who, run.session_id)
    last = {
        kind: next((_checkpoint(tinker, c) for c in reversed(saved) if c.kind == kind), None)
        for kind in CHECKPOINT_TYPES
    }
    return {
        "training_run_id": run.model_id,
        "base_model": run.base_model,
        "model_owner": run.owner,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": run.lora_rank,
        "user_metadata": run.user_metadata,
        "last_request_time": iso(max([run.created_at, *(c.created_at for c in saved)])),
        "last_checkpoint": last["state"],
        "last_sampler_checkpoint": last["sampler"],
    }


def _bios_checkpoint(tinker: Tinker, who: str, run_id: str, kind: str, name: str) -> str:
    """The Bios path of `who`'s checkpoint `tinker://RUN_ID/KIND/NAME` (NotFoundError if not `who`'s)."""
    return tinker.service.check_checkpoint(who, tinker.runs.bios_path(who, f"tinker://{run_id}/{kind}/{name}"))


@router.get("/training_runs")
def list_training_runs(
    who: TinkerOwnerDep,
    tinker: TinkerDep,
    limit: int = Query(20, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    access_scope: str = "owned",
) -> dict:
    if access_scope != "owned":
        raise InvalidRequestError(
            f"access_scope: only 'owned' is supported, got {access_scope!r}", field="access_scope"
        )
    page, total = tinker.runs.page(who, limit, offset)
    return {
        "training_runs": [_training_run(tinker, who, run) for run in page],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    return _training_run(tinker, who, tinker.runs.get(who, run_id))


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    run = tinker.runs.get(who, run_id)
    return {"checkpoints": [_checkpoint(tinker, c) for c in tinker.service.list_checkpoints(who, run.session_id)]}


@router.get("/checkpoints")
def list_user_checkpoints(
    who: TinkerOwnerDep,
    tinker: TinkerDep,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
) -> dict:
    page, _total = tinker.runs.page(who, 1 << 30, 0)
    everything = sorted(
        (c for run in page for c in tinker.service.list_checkpoints(who, run.session_id)),
        key=lambda c: c.created_at,
        reverse=True,
    )
    return {
        "checkpoints": [_checkpoint(tinker, c) for c in everything[offset : offset + limit]],
        "cursor": {"offset": offset, "limit": limit, "total_count": len(everything)},
    }


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(run_id: str, kind: str, name: str, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    tinker.service.delete_checkpoint(who, tinker.runs.bios_path(who, f"tinker://{run_id}/{kind}/{name}"))
    return {}


@router.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
def set_checkpoint_ttl(
    run_id: str, kind: str, name: str, body: CheckpointTtl, who: TinkerOwnerDep, tinker: TinkerDep
) -> dict:
    """The checkpoint expires `ttl_seconds` from now (None: never)."""
    tinker.service.set_checkpoint_ttl(who, _bios_checkpoint(tinker, who, run_id, kind, name), body.ttl_seconds)
    return {}


@router.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls")
def get_external_weights_urls(
    run_id: str, kind: str, name: str, request: Request, who: TinkerOwnerDep, tinker: TinkerDep
) -> dict:
    """`{"urls": {FILE: URL}, "expires"}`: signed URLs (no API key needed) of the files of an
    external weights checkpoint, valid for 15 minutes."""
    path = _bios_checkpoint(tinker, who, run_id, kind, name)
    signed = external_weights_urls(tinker.service, tinker.signer, request, who, path)
    return {"urls": signed.urls, "expires": signed.expires.isoformat() if signed.expires else None}


@router.post("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
def publish_checkpoint(run_id: str, kind: str, name: str, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """Any key may now read the checkpoint (load it, sample from it)."""
    tinker.service.publish_checkpoint(who, _bios_checkpoint(tinker, who, run_id, kind, name), public=True)
    return {}


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
def unpublish_checkpoint(run_id: str, kind: str, name: str, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """Only its owner may read the checkpoint again."""
    tinker.service.publish_checkpoint(who, _bios_checkpoint(tinker, who, run_id, kind, name), public=False)
    return {}


@router.post("/weights_info")
def weights_info(body: WeightsInfo, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """The LoRA configuration a checkpoint holds."""
    path = tinker.readable_path(who, body.tinker_path)
    spec = tinker.engine.store.load(path, "inspected").spec
    return {
        "base_model": spec.base_model,
        "is_lora": True,
        "lora_rank": spec.rank,
        "optimizer_config": {"type": "adamw"},
        "train_attn": set(ATTENTION_MODULES) <= set(spec.target_modules),
        "train_mlp": set(MLP_MODULES) <= set(spec.target_modules),
        "train_unembed": "lm_head" in spec.target_modules,
    }


@router.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/archive")
def archive_url(run_id: str, kind: str, name: str, request: Request, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """`{"url", "expires"}`: a signed URL (no API key needed) of the checkpoint as a tar of
    its PEFT LoRA adapter, valid for 15 minutes."""
    token, expires = tinker.signer.token(_bios_checkpoint(tinker, who, run_id, kind, name))
    return {"url": str(request.url_for("tinker_archive", token=token)), "expires": iso(expires)}


@router.get("/archives/{token}", name="tinker_archive")
def download_archive(token: str, tinker: TinkerDep) -> FileResponse:
    engine = tinker.engine
    archive = build_archive(engine.store, engine.catalog, tinker.signer.path(token))
    return FileResponse(
        archive,
        media_type="application/x-tar",
        filename="checkpoint.tar",
        background=BackgroundTask(os.unlink, archive),
    )
