"""Checkpoint archives for SDK releases that download them (`get_checkpoint_archive_url`, 0.33.x).

The SDK asks for a URL and fetches it with a plain GET that carries no API key, so the URL
is signed (`bios.server.downloads.DownloadSigner`). The archive is a tar of the checkpoint's weights as a
Hugging Face PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) plus the
`checkpoint_complete` marker the SDK's export command looks for.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from bios.catalog import Catalog
from bios.engine import CheckpointStore
from bios.engine.peft import write_peft_adapter

COMPLETE_MARKER = "checkpoint_complete"


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
