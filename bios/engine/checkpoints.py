"""The checkpoint store: adapter states on disk under `BIOS_HOME/checkpoints`, named by `bios://` paths.

`bios://SESSION/weights/NAME` holds a training state (weights + Adam moments + step);
`bios://SESSION/sampler_weights/NAME` a frozen sampler snapshot (weights only);
`bios://SESSION/external_weights/NAME` weights saved to be downloaded. Each is a
directory with the tensors (`adapter.safetensors`, or `orbax/` when the backend asks for Orbax:
see tensor_files.py) and `checkpoint.json` (a sampler snapshot and external weights also `peft/`,
the same weights as a Hugging Face PEFT LoRA adapter that PEFT and vLLM load), written to a
temporary directory and renamed into place, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bios.backend import AdapterSpec, AdapterState
from bios.catalog import ModelSpec
from bios.engine.merged import write_merged_model
from bios.engine.peft import CONFIG_FILE, write_peft_adapter
from bios.engine.tensor_files import read_tensors, write_tensors
from bios.errors import InvalidRequestError, NotFoundError
from bios.types import StateResult
from bios.validation import KIND_DIRS, SCHEME, parse_path

PEFT_DIR = "peft"
MERGED_DIR = "merged"
WITH_PEFT = ("sampler", "external")
"""The kinds of checkpoint saved with their PEFT export."""
_LOCK = threading.RLock()
"""Held while a checkpoint directory is swapped and while one is read, so that a reader in this
process (any store) sees the old checkpoint or the new one, never the gap between them."""


def checkpoint_path(session_id: str, kind: str, name: str) -> str:
    return f"{SCHEME}{session_id}/{KIND_DIRS[kind]}/{name}"


class CheckpointStore:
    """Reads and writes adapter states. Safe to use from several threads."""

    def __init__(self, root: Path, tensor_format: str = "safetensors") -> None:
        """root: the checkpoints directory; tensor_format: how tensors are written ("safetensors"
        or "orbax"); any format is read."""
        self.root = Path(root)
        self.tensor_format = tensor_format

    def _directory(self, session_id: str, kind: str, name: str) -> Path:
        return self.root / session_id / KIND_DIRS[kind] / name

    def save(
        self,
        state: AdapterState,
        session_id: str,
        kind: str,
        name: str,
        metadata: dict[str, Any],
        model: ModelSpec | None = None,
        ttl_seconds: float | None = None,
        *,
        merged: str | None = None,
    ) -> StateResult:
        """Write `state` (optimizer moments only for kind "state"), replacing an older one of the same name.

        A sampler snapshot or external weights also get their PEFT export in `peft/`, which needs
        `model` (the adapter's base).
        With `ttl_seconds`, the checkpoint is gone that long after the save: reading it is then a
        NotFoundError, listing skips it, and its files are deleted when next looked at. External
        weights with `merged` (a dtype of `MERGED_DTYPES`) also hold the merged model in `merged/`."""
        if kind in WITH_PEFT and model is None:
            raise ValueError(f"a {kind} checkpoint needs the ModelSpec of its base model to write its PEFT adapter")
        tensors = {f"weights/{k}": v for k, v in state.weights.items()}
        if kind == "state":
            tensors |= {f"adam_m/{k}": v for k, v in state.adam_m.items()}
            tensors |= {f"adam_v/{k}": v for k, v in state.adam_v.items()}
        spec = asdict(state.spec)
        spec.pop("adapter_id")
        record = StateResult(
            path=checkpoint_path(session_id, kind, name),
            id=uuid.uuid4().hex[:16],
            name=name,
            kind=kind,
            step=state.step,
            base_model=state.spec.base_model,
            metadata=metadata,
            created_at=(now := time.time()),
            expires_at=None if ttl_seconds is None else now + ttl_seconds,
        )
        final = self._directory(session_id, kind, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}."))
        try:
            write_tensors(staging, tensors, self.tensor_format)
            (staging / "checkpoint.json").write_text(
                json.dumps({"record": record.model_dump(), "adapter": spec}, indent=1)
            )
            if kind in WITH_PEFT:
                write_peft_adapter(state, model, staging / PEFT_DIR)  # type: ignore[arg-type]
            if merged is not None:
                (staging / MERGED_DIR).mkdir()
                write_merged_model(state, model, staging / MERGED_DIR, merged)  # type: ignore[arg-type]
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # the old checkpoint, if any, stays as it was
            raise
        retired = None
        with _LOCK:
            if final.exists():
                retired = final.with_name(f".{name}.old.{uuid.uuid4().hex[:6]}")
                os.replace(final, retired)
            os.replace(staging, final)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        return record.model_copy(update={"size_bytes": _size_of(final)})

    def record(self, path: str) -> StateResult:
        """The saved record of `path`, with its `size_bytes`; NotFoundError if there is none."""
        with _LOCK:
            record = StateResult.model_validate(self._read_json(path)["record"])
            return record.model_copy(update={"size_bytes": _size_of(self._directory(*parse_path(path)))})

    def load(self, path: str, adapter_id: str) -> AdapterState:
        """The state stored at `path`, as an adapter named `adapter_id`."""
        with _LOCK:
            meta = self._read_json(path)
            tensors = read_tensors(self._directory(*parse_path(path)))
        groups: dict[str, dict[str, np.ndarray]] = {"weights": {}, "adam_m": {}, "adam_v": {}}
        for key, value in tensors.items():
            group, _, tensor = key.partition("/")
            groups[group][tensor] = value
        spec = meta["adapter"]
        return AdapterState(
            spec=AdapterSpec(adapter_id=adapter_id, **{**spec, "target_modules": tuple(spec["target_modules"])}),
            step=int(meta["record"]["step"]),
            weights=groups["weights"],
            adam_m=groups["adam_m"],
            adam_v=groups["adam_v"],
        )

    def peft_directory(self, path: str) -> Path:
        """The local directory of the PEFT LoRA adapter exported with checkpoint `path` (a sampler
        snapshot or external weights)
        (`adapter_config.json` + `adapter_model.safetensors`); NotFoundError if it has none."""
        directory = self._directory(*parse_path(path)) / PEFT_DIR
        with _LOCK:
            record = self.record(path)  # NotFoundError when there is no checkpoint at all
            if not (directory / CONFIG_FILE).is_file():
                raise NotFoundError(
                    f"path: checkpoint {path} ({record.kind}) has no PEFT export; sampler checkpoints "
                    "(save_weights_for_sampler, bios://SESSION/sampler_weights/NAME) and external "
                    "weights (save_weights_external) saved by this version of Bios carry one",
                    field="path",
                )
        return directory

    def external_files(self, path: str) -> dict[str, Path]:
        """The files of external weights checkpoint `path`, keyed by their path within it: its
        PEFT adapter, and its merged model under `merged/` when it was saved with one.
        NotFoundError if there is no such checkpoint; InvalidRequestError naming `path` for
        another kind of checkpoint."""
        with _LOCK:
            record = self.record(path)
            if record.kind != "external":
                raise InvalidRequestError(
                    f"path: {path} is not external weights; save them with save_weights_external "
                    "(bios://SESSION/external_weights/NAME) to download them",
                    field="path",
                )
            adapter = self.peft_directory(path)
            files = {f.name: f for f in sorted(adapter.iterdir()) if f.is_file()}
            merged = adapter.parent / MERGED_DIR
            if merged.is_dir():
                files |= {f"{MERGED_DIR}/{f.name}": f for f in sorted(merged.iterdir()) if f.is_file()}
            return files

    def set_ttl(self, path: str, ttl_seconds: float | None) -> StateResult:
        """Make checkpoint `path` expire `ttl_seconds` from now (None: keep it until deleted);
        its record as it is now. NotFoundError if there is no such checkpoint (or it expired)."""
        return self._update(path, expires_at=None if ttl_seconds is None else time.time() + ttl_seconds)

    def set_public(self, path: str, public: bool) -> StateResult:
        """Publish checkpoint `path` (a server lets any key read it) or unpublish it; its record
        as it is now. NotFoundError if there is no such checkpoint (or it expired)."""
        return self._update(path, public=public)

    def _update(self, path: str, **changes: object) -> StateResult:
        """Rewrite `changes` into the record of checkpoint `path` (atomically); the record."""
        with _LOCK:
            data = self._read_json(path)
            data["record"].update(changes)
            meta = self._directory(*parse_path(path)) / "checkpoint.json"
            staging = meta.with_name(f".checkpoint.json.{uuid.uuid4().hex[:6]}")
            staging.write_text(json.dumps(data, indent=1))
            os.replace(staging, meta)
        return self.record(path)

    def list(self, session_id: str | None = None) -> list[StateResult]:
        """Every checkpoint (of one session, if given), oldest first, each with its `size_bytes`."""
        records = []
        with _LOCK:
            for meta in sorted(self.root.glob(f"{session_id or '*'}/*/*/checkpoint.json")):
                if not meta.parent.name.startswith("."):
                    record = StateResult.model_validate(json.loads(meta.read_text())["record"])
                    if _expired(record.expires_at):
                        shutil.rmtree(meta.parent, ignore_errors=True)
                        continue
                    records.append(record.model_copy(update={"size_bytes": _size_of(meta.parent)}))
        return sorted(records, key=lambda r: r.created_at)

    def delete(self, path: str) -> None:
        """Remove the checkpoint at `path`; NotFoundError if there is none."""
        with _LOCK:
            self._read_json(path)
            shutil.rmtree(self._directory(*parse_path(path)))

    def _read_json(self, path: str) -> dict[str, Any]:
        """The checkpoint.json of `path`; NotFoundError if there is none or it has expired (its
        files are deleted then)."""
        directory = self._directory(*parse_path(path))
        try:
            with _LOCK:
                data: dict[str, Any] = json.loads((directory / "checkpoint.json").read_text())
                expires_at = data["record"].get("expires_at")
                if _expired(expires_at):
                    shutil.rmtree(directory, ignore_errors=True)
                    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires_at))
                    raise NotFoundError(
                        f"path: checkpoint {path} expired at {when} (its ttl_seconds ran out); save a new one",
                        field="path",
                    )
                return data
        except FileNotFoundError:
            raise NotFoundError(f"path: no checkpoint at {path}", field="path") from None


def _expired(expires_at: float | None) -> bool:
    return expires_at is not None and time.time() >= expires_at


def _size_of(directory: Path) -> int:
    """Bytes of every file under `directory`."""
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
