"""The RestClient's endpoints: training runs, checkpoints, weights info, archive downloads.

Everything listed is the caller's own: another key's runs and checkpoints are not found.
Only checkpoints of Tinker runs are listed (a native Bios session has no Tinker path).
"""

from __future__ import annotations

import datetime
import os

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from bios.errors import InvalidRequestError
from bios.server.tinker.archive import build_archive
from bios.server.tinker.bodies import WeightsInfo
from bios.server.tinker.context import Tinker
from bios.server.tinker.ids import Run
from bios.types import StateResult
from bios.types.params import ATTENTION_MODULES, MLP_MODULES

CHECKPOINT_TYPES = {"state": "training", "sampler": "sampler"}


def iso(timestamp: float) -> str:
    """Unix time as an ISO-8601 UTC datetime."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def add_rest_routes(router: APIRouter, tinker: Tinker) -> None:
    owner = Depends(tinker.owner)
    service, engine, runs = tinker.service, tinker.engine, tinker.runs

    def checkpoints_of(who: str, run: Run) -> list[StateResult]:
        return service.list_checkpoints(who, run.session_id)

    def checkpoint(record: StateResult) -> dict:
        path = runs.tinker_path(record.path)
        return {
            "checkpoint_id": path.split("/", 3)[3],
            "checkpoint_type": CHECKPOINT_TYPES[record.kind],
            "time": iso(record.created_at),
            "tinker_path": path,
            "public": False,
            "user_metadata": {k: v if isinstance(v, str) else str(v) for k, v in record.metadata.items()},
        }

    def training_run(who: str, run: Run) -> dict:
        """The run as a Tinker `TrainingRun`; its last request time is the latest activity on
        record (its creation or its newest checkpoint)."""
        saved = checkpoints_of(who, run)
        last = {
            kind: next((checkpoint(c) for c in reversed(saved) if c.kind == kind), None) for kind in CHECKPOINT_TYPES
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

    def bios_checkpoint(who: str, run_id: str, kind: str, name: str) -> str:
        return service.check_checkpoint(who, runs.bios_path(who, f"tinker://{run_id}/{kind}/{name}"))

    @router.get("/training_runs")
    def list_training_runs(
        limit: int = Query(20, ge=1, le=1000),
        offset: int = Query(0, ge=0),
        access_scope: str = "owned",
        who: str = owner,
    ) -> dict:
        if access_scope != "owned":
            raise InvalidRequestError(
                f"access_scope: only 'owned' is supported, got {access_scope!r}", field="access_scope"
            )
        page, total = runs.page(who, limit, offset)
        return {
            "training_runs": [training_run(who, run) for run in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }

    @router.get("/training_runs/{run_id}")
    def get_training_run(run_id: str, who: str = owner) -> dict:
        return training_run(who, runs.get(who, run_id))

    @router.get("/training_runs/{run_id}/checkpoints")
    def list_run_checkpoints(run_id: str, who: str = owner) -> dict:
        return {"checkpoints": [checkpoint(c) for c in checkpoints_of(who, runs.get(who, run_id))]}

    @router.get("/checkpoints")
    def list_user_checkpoints(
        limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0), who: str = owner
    ) -> dict:
        page, _total = runs.page(who, 1 << 30, 0)
        everything = sorted(
            (c for run in page for c in checkpoints_of(who, run)), key=lambda c: c.created_at, reverse=True
        )
        return {
            "checkpoints": [checkpoint(c) for c in everything[offset : offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(everything)},
        }

    @router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
    def delete_checkpoint(run_id: str, kind: str, name: str, who: str = owner) -> dict:
        service.delete_checkpoint(who, runs.bios_path(who, f"tinker://{run_id}/{kind}/{name}"))
        return {}

    @router.post("/weights_info")
    def weights_info(body: WeightsInfo, who: str = owner) -> dict:
        """The LoRA configuration a checkpoint holds."""
        spec = engine.store.load(service.check_checkpoint(who, runs.bios_path(who, body.tinker_path)), "inspected").spec
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
    def archive_url(run_id: str, kind: str, name: str, request: Request, who: str = owner) -> dict:
        """`{"url", "expires"}`: a signed URL (no API key needed) of the checkpoint as a tar of
        its PEFT LoRA adapter, valid for 15 minutes."""
        token, expires = tinker.signer.token(bios_checkpoint(who, run_id, kind, name))
        return {"url": str(request.url_for("tinker_archive", token=token)), "expires": iso(expires)}

    @router.get("/archives/{token}", name="tinker_archive")
    def download_archive(token: str) -> FileResponse:
        archive = build_archive(engine.store, engine.catalog, tinker.signer.path(token))
        return FileResponse(
            archive,
            media_type="application/x-tar",
            filename="checkpoint.tar",
            background=BackgroundTask(os.unlink, archive),
        )
