"""Where a resumed session starts: a saved training state, or a Hugging Face PEFT adapter.

Everything is checked before anything is created, so a refused start changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from bios import validation
from bios.backend import AdapterState
from bios.catalog import Catalog
from bios.engine.checkpoints import CheckpointStore
from bios.engine.peft import is_local_directory, read_peft_adapter
from bios.errors import InvalidRequestError
from bios.types import StateResult
from bios.validation import SCHEME


def starting_state(
    store: CheckpointStore,
    catalog: Catalog,
    path: str | os.PathLike[str],
    base_model: str | None,
    session_id: str,
    *,
    optimizer: bool,
) -> AdapterState:
    """The adapter state a new session `session_id` starts from.

    `path` is a `bios://SESSION/weights/NAME` checkpoint (weights, optimizer moments and step;
    without `optimizer`, the weights only at step 0 with zero moments; `base_model` may be
    given only as its own), or a local directory holding a PEFT LoRA adapter
    (`adapter_config.json` + `adapter_model.safetensors`) on `base_model`, which is then
    required (step 0, zero moments). InvalidRequestError / NotFoundError name the field.
    """
    if is_local_directory(path):
        return _peft_state(catalog, Path(path), base_model, session_id)
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise InvalidRequestError(
            f"path {str(path)!r} is neither a checkpoint path (bios://SESSION/weights/NAME) nor a local "
            "directory holding a PEFT LoRA adapter (adapter_config.json)",
            field="path",
        )
    record = training_state(store.record(path))
    if base_model is not None and base_model != record.base_model:
        raise InvalidRequestError(
            f"base_model: {path} holds an adapter for {record.base_model}, not {base_model!r}", field="base_model"
        )
    state = weights_only(store.load(path, session_id), optimizer)
    catalog.get(state.spec.base_model)
    return state


def _peft_state(catalog: Catalog, directory: Path, base_model: str | None, session_id: str) -> AdapterState:
    """The state of a session starting from the PEFT LoRA adapter in `directory`."""
    if base_model is None:
        raise InvalidRequestError(
            f"base_model: {directory} is a PEFT adapter, which does not name a Bios model; pass base_model=",
            field="base_model",
        )
    model = catalog.get(base_model)
    lora, weights = read_peft_adapter(directory, model)
    adapter = validation.lora_adapter(session_id, model, lora)
    return AdapterState(spec=adapter, step=0, weights=weights)  # no moments: the backend starts them at zero


def training_state(record: StateResult) -> StateResult:
    """`record` if it is a full training state; sampler snapshots and external weights lack the
    optimizer moments."""
    if record.kind != "state":
        what = "a sampler snapshot" if record.kind == "sampler" else "external weights"
        raise InvalidRequestError(
            f"path {record.path} is {what} (weights only); resume training from a "
            "save_state checkpoint (bios://SESSION/weights/NAME)",
            field="path",
        )
    return record


def weights_only(state: AdapterState, optimizer: bool) -> AdapterState:
    """`state` itself, or (without `optimizer`) its weights at step 0 with no moments, which a
    backend starts at zero."""
    return state if optimizer else AdapterState(spec=state.spec, step=0, weights=state.weights)
