"""Exports of trained adapters that Hugging Face loads: a PEFT LoRA adapter, or a whole model
with the LoRA merged into its base weights.

Both read a `bios://SESSION/weights|sampler_weights/NAME` checkpoint of the local store
(`BIOS_HOME/checkpoints`) and write one directory:

    export_peft    adapter_config.json + adapter_model.safetensors (bios.engine.peft), for
                   `peft.PeftModel.from_pretrained(base, out)`
    export_merged  config.json + model.safetensors + tokenizer files, for
                   `transformers.AutoModelForCausalLM.from_pretrained(out)`

How the LoRA is merged: bios.engine.merged.

Everything is validated before anything is written; the directory is built under a temporary
sibling name and renamed into place, so a failed export leaves nothing behind and a reader never
sees half of one. A non-empty `out` is never overwritten.
Imports the contract layer and the engine's checkpoint store, PEFT writer and merger; never a backend.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bios.backend import AdapterState
from bios.catalog import Catalog, ModelSpec
from bios.config import bios_home
from bios.engine.checkpoints import CheckpointStore
from bios.engine.merged import check_dtype, write_merged_model
from bios.engine.peft import write_peft_adapter
from bios.errors import InvalidRequestError, NotFoundError
from bios.types import StateResult
from bios.weights import lora_shapes


def export_peft(path: str, out: Path, *, home: Path | None = None, catalog: Catalog | None = None) -> Path:
    """Write checkpoint `path`'s adapter as a PEFT LoRA directory at `out` (created; returned).

    A sampler checkpoint's own PEFT export is copied; a training state's weights are written
    afresh (float32; optimizer moments are not part of PEFT's format), which needs its base
    model from `catalog` (default: the built-in models and those installed under `home/models`).
    `home`: default BIOS_HOME.

    Raises InvalidRequestError (field `path`) for a malformed path or an adapter that does not fit
    its base model, NotFoundError (`path`) when there is no such checkpoint, NotFoundError
    (`base_model`) for a base model the catalog lacks, InvalidRequestError (`out`) when `out` is
    a file or a non-empty directory. Writes nothing unless it succeeds.
    """
    store = _store(home)
    record = store.record(path)
    out = _check_out(out)
    source = _sampler_peft(store, record)
    if source is not None:
        return _publish(
            out, lambda staging: _copy_files(source, staging, [p.name for p in source.iterdir() if p.is_file()])
        )
    model = _model(catalog, record, home)
    state = _load(store, record, model)
    return _publish(out, lambda staging: write_peft_adapter(state, model, staging))


def export_merged(
    path: str, out: Path, *, home: Path | None = None, dtype: str = "float32", catalog: Catalog | None = None
) -> Path:
    """Write checkpoint `path`'s base model with its LoRA merged in as a Hugging Face model
    directory at `out` (created; returned): config.json, model.safetensors in `dtype`
    ("float32" or "bfloat16", rounded to nearest even), and the tokenizer files
    (bios.engine.merged).

    The base model comes from `catalog` (default as for `export_peft`): a built-in model's seeded
    weights with a config.json written from its spec, or a Hugging Face directory's weights with
    its config.json and tokenizer files copied (dtype and, when lm_head is untied, the tying
    updated). `home`: default BIOS_HOME.

    Raises as `export_peft` does, and InvalidRequestError (field `dtype`) for another dtype,
    NotFoundError (`base_model`) when a Hugging Face base model's files cannot be read.
    Writes nothing unless it succeeds.
    """
    check_dtype(dtype)
    store = _store(home)
    record = store.record(path)
    out = _check_out(out)
    model = _model(catalog, record, home)
    state = _load(store, record, model)
    return _publish(out, lambda staging: write_merged_model(state, model, staging, dtype))


def _store(home: Path | None) -> CheckpointStore:
    return CheckpointStore(Path(home if home is not None else bios_home()) / "checkpoints")


def _check_out(out: Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequestError(
            f"out: {out} already exists and is not an empty directory; give a new or empty directory", field="out"
        )
    return out


def _model(catalog: Catalog | None, record: StateResult, home: Path | None) -> ModelSpec:
    """`record`'s base model from `catalog`, by default the built-in models and those installed
    under `home/models` (`bios models fetch`), as the in-process service serves them."""
    if catalog is None:
        catalog = Catalog()
        catalog.register_installed(Path(home if home is not None else bios_home()) / "models")
    try:
        return catalog.get(record.base_model)
    except NotFoundError as exc:
        raise NotFoundError(
            f"checkpoint {record.path} was trained on {record.base_model}, "
            f"which is not in the model catalog ({exc.message})",
            field="base_model",
        ) from None


def _load(store: CheckpointStore, record: StateResult, model: ModelSpec) -> AdapterState:
    """The adapter at `record.path`, checked to fit `model` (InvalidRequestError field `path` if not)."""
    state = store.load(record.path, "export")
    expected = lora_shapes(model, state.spec.target_modules, state.spec.rank)
    if {k: tuple(v.shape) for k, v in state.weights.items()} != expected:
        raise InvalidRequestError(
            f"path: the adapter at {record.path} does not fit {model.name} as the catalog describes it "
            f"({state.spec.target_modules} at rank {state.spec.rank}); was the model changed since training?",
            field="path",
        )
    return state


def _sampler_peft(store: CheckpointStore, record: StateResult) -> Path | None:
    """The PEFT directory saved with a sampler checkpoint, or None (a training state, or an older snapshot)."""
    if record.kind != "sampler":
        return None
    try:
        return store.peft_directory(record.path)
    except NotFoundError:
        return None


def _copy_files(source: Path, destination: Path, names: list[str]) -> None:
    for name in names:
        shutil.copyfile(source / name, destination / name)


def _publish(out: Path, write: Callable[[Path], None]) -> Path:
    """Run `write` on a fresh temporary sibling of `out`, then rename it to `out` (absent or an
    empty directory). On any failure, removes the temporary directory and any parent it made."""
    created = next((p for p in [out.parent, *out.parent.parents][::-1] if not p.exists()), None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    except OSError as exc:
        raise InvalidRequestError(f"out: cannot create a directory next to {out} ({exc})", field="out") from None
    try:
        write(staging)
        os.chmod(staging, 0o755)  # mkdtemp's 0o700 is for the staging name only
        os.replace(staging, out)  # POSIX: replaces an empty directory, fails on a non-empty one
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return out
