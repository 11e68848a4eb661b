"""Checkpoint archives for SDK releases that download them (`get_checkpoint_archive_url`, 0.33.x).

The SDK asks for a URL and fetches it with a plain GET that carries no API key, so the URL
is signed: it names the Bios checkpoint path and an expiry, with an HMAC under a key that
lives as long as the server process. The archive is a tar of the checkpoint's weights as a
Hugging Face PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) plus the
`checkpoint_complete` marker the SDK's export command looks for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from bios.catalog import Catalog
from bios.engine import CheckpointStore
from bios.engine.peft import write_peft_adapter
from bios.errors import NotFoundError

URL_LIFETIME_S = 900.0
COMPLETE_MARKER = "checkpoint_complete"


class ArchiveSigner:
    """Signs and checks download tokens: each grants one string (a checkpoint path, or what
    another download names) until it expires."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def token(self, path: str, now: float | None = None) -> tuple[str, float]:
        """A token granting the download of `path`, and the unix time it expires."""
        expires = (time.time() if now is None else now) + URL_LIFETIME_S
        payload = base64.urlsafe_b64encode(json.dumps([path, expires]).encode()).decode().rstrip("=")
        return f"{payload}.{self._sign(payload)}", expires

    def path(self, token: str, now: float | None = None) -> str:
        """The string `token` grants; NotFoundError if it is forged, malformed or expired."""
        payload, _, signature = token.partition(".")
        try:
            if not hmac.compare_digest(signature, self._sign(payload)):
                raise ValueError("bad signature")
            path, expires = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            raise NotFoundError("url: no download at this URL", field="url") from None
        if (time.time() if now is None else now) > expires:
            raise NotFoundError("url: this download URL has expired; ask for a new one", field="url")
        return path

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()


def build_archive(store: CheckpointStore, catalog: Catalog, path: str) -> Path:
    """A new temporary tar file of checkpoint `path` as a PEFT adapter; the caller deletes it."""
    record = store.record(path)
    work = Path(tempfile.mkdtemp(prefix="bios-archive-"))
    try:
        if record.kind == "sampler":
            adapter = store.peft_directory(path)
        else:
            adapter = work / "adapter"
            write_peft_adapter(store.load(path, "archive"), catalog.get(record.base_model), adapter)
        (work / COMPLETE_MARKER).write_text(json.dumps({"path": path, "step": record.step}))
        archive = Path(tempfile.mkstemp(prefix="bios-archive-", suffix=".tar")[1])
        with tarfile.open(archive, "w") as tar:
            for file in sorted(adapter.iterdir()):
                tar.add(file, arcname=file.name)
            tar.add(work / COMPLETE_MARKER, arcname=COMPLETE_MARKER)
        return archive
    finally:
        shutil.rmtree(work, ignore_errors=True)
