"""Exports of trained adapters that Hugging Face loads: a PEFT LoRA adapter, or a whole model
with the LoRA merged into its base weights.

Both read a `bios://SESSION/weights|sampler_weights/NAME` checkpoint of the local store
(`BIOS_HOME/checkpoints`) and write one directory:

    export_peft    adapter_config.json + adapter_model.safetensors (bios.engine.peft), for
                   `peft.PeftModel.from_pretrained(base, out)`
    export_merged  config.json + model.safetensors + tokenizer files, for
                   `transformers.AutoModelForCausalLM.from_pretrained(out)`

Merging (letters as in docs/shapes.md; `in`/`out` are a linear layer's widths): Bios keeps a
base linear as W [out, in] (Hugging Face's layout) and its LoRA factors as A [in, R], B [R, out],
computing y = x Wᵀ + (alpha / R) · x A B; the merged weight is W' = W + (alpha / R) · (A B)ᵀ,
[out, in]. An adapted lm_head on a model with tied embeddings unties it: the export then carries
its own `lm_head.weight` and says `tie_word_embeddings: false`.

Everything is validated before anything is written; the directory is built under a temporary
sibling name and renamed into place, so a failed export leaves nothing behind and a reader never
sees half of one. A non-empty `out` is never overwritten.
Imports the contract layer and the engine's checkpoint store and PEFT writer; never a backend.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import numpy as np

from bios.backend import AdapterState
from bios.catalog import Catalog, ModelSpec
from bios.config import bios_home
from bios.engine.checkpoints import CheckpointStore
from bios.engine.peft import write_peft_adapter
from bios.errors import InvalidRequestError, NotFoundError
from bios.types import StateResult
from bios.weights import load_base_weights, lora_shapes

DTYPES = ("float32", "bfloat16")
"""Tensor dtypes of a merged export."""
ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
"""Files copied from a Hugging Face base model's directory into a merged export, when present."""
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


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
    ("float32" or "bfloat16", rounded to nearest even), and the tokenizer files.

    The base model comes from `catalog` (default as for `export_peft`): a built-in model's seeded
    weights with a config.json written from its spec, or a Hugging Face directory's weights with
    its config.json and tokenizer files copied (dtype and, when lm_head is untied, the tying
    updated). `home`: default BIOS_HOME.

    Raises as `export_peft` does, and InvalidRequestError (field `dtype`) for another dtype,
    NotFoundError (`base_model`) when a Hugging Face base model's files cannot be read.
    Writes nothing unless it succeeds.
    """
    if dtype not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
    store = _store(home)
    record = store.record(path)
    out = _check_out(out)
    model = _model(catalog, record, home)
    state = _load(store, record, model)
    try:
        base = load_base_weights(model)
    except (OSError, ValueError, KeyError) as exc:
        raise NotFoundError(
            f"base_model: cannot read the weights of {model.name} from {model.hf_path} ({exc})", field="base_model"
        ) from None
    tensors = merge_lora(model, base, state)
    config = hf_config(model, dtype, untied="lm_head.weight" in tensors and model.tie_embeddings)
    tokenizer_dir = Path(model.hf_path) if model.hf_path else Path(str(files("bios") / "data" / "tokenizer"))
    tokenizer_files = [f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]

    def write(staging: Path) -> None:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(staging / "model.safetensors", tensors, dtype)
        _copy_files(tokenizer_dir, staging, tokenizer_files)

    return _publish(out, write)


def merge_lora(model: ModelSpec, base: dict[str, np.ndarray], state: AdapterState) -> dict[str, np.ndarray]:
    """Base weights by Hugging Face name (linears [out, in]) with every adapted linear replaced by
    W + (alpha / R) · (A B)ᵀ, float32; computed in float64. Does not mutate `base`.

    An adapted lm_head of a tied model becomes its own `lm_head.weight` [V, D] (embed_tokens
    unchanged); otherwise the names are exactly `base`'s."""
    scale = state.spec.alpha / state.spec.rank
    merged = dict(base)
    for name in sorted(state.weights):
        if not name.endswith(".lora_A"):
            continue
        module = name.removesuffix(".lora_A")
        a = state.weights[name].astype(np.float64)  # [in, R]
        b = state.weights[f"{module}.lora_B"].astype(np.float64)  # [R, out]
        weight = (
            base["model.embed_tokens.weight"]
            if module == "lm_head" and model.tie_embeddings
            else base[f"{module}.weight"]
        )
        merged[f"{module}.weight"] = (weight.astype(np.float64) + scale * (a @ b).T).astype(np.float32)  # [out, in]
    return merged


def hf_config(model: ModelSpec, dtype: str, untied: bool) -> dict:
    """The config.json of `model` as a transformers `*ForCausalLM` in `dtype`; `untied` sets
    tie_word_embeddings false. A Hugging Face base model's own config is copied and updated."""
    if model.hf_path is not None:
        config = json.loads((Path(model.hf_path) / "config.json").read_text())
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = dtype
        if untied:
            config["tie_word_embeddings"] = False
        return config
    tokenizer = model.tokenizer()
    config = {
        "architectures": [ARCHITECTURE_CLASSES[model.architecture]],
        "model_type": model.architecture,
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.d_ff,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.rms_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": {"rope_type": "llama3", **dict(model.rope_scaling)} if model.rope_scaling else None,
        "tie_word_embeddings": model.tie_embeddings and not untied,
        "attention_bias": model.qkv_bias,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model.architecture == "llama":
        config["mlp_bias"] = False
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": model.n_layers}
    return config


def write_safetensors(file: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write float32 `tensors` to a safetensors `file` as F32 or BF16 (round to nearest even),
    sorted by name, with metadata format "pt". Written here because numpy has no bfloat16."""
    header: dict[str, dict[str, object]] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        size = tensors[name].size * (4 if dtype == "float32" else 2)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for name in sorted(tensors):
            array = np.ascontiguousarray(tensors[name], dtype="<f4")
            handle.write((array if dtype == "float32" else _bfloat16_bits(array)).tobytes())


def _bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = array.view("<u4").astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return np.where(np.isnan(array), np.uint16(0x7FC0), rounded).astype("<u2")


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
