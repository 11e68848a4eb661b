"""A whole Hugging Face model with a LoRA adapter merged into its base weights: config.json,
model.safetensors and the tokenizer files, which `transformers.AutoModelForCausalLM` loads.

Merging (letters as in docs/shapes.md; `in`/`out` are a linear layer's widths): Bios keeps a
base linear as W [out, in] (Hugging Face's layout) and its LoRA factors as A [in, R], B [R, out],
computing y = x Wᵀ + (alpha / R) · x A B; the merged weight is W' = W + (alpha / R) · (A B)ᵀ,
[out, in]. An adapted lm_head on a model with tied embeddings unties it: the model then carries
its own `lm_head.weight` and says `tie_word_embeddings: false`.

Used by `bios export --merged` (bios.export) and by external weights saved with a merged model
(`save_weights_external(..., merged=DTYPE)`, bios.engine.checkpoints).
"""

from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from bios.backend import AdapterState
from bios.catalog import ModelSpec
from bios.errors import InvalidRequestError, NotFoundError
from bios.validation import MERGED_DTYPES
from bios.weights import load_base_weights

DTYPES = MERGED_DTYPES
"""Tensor dtypes of a merged model."""
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


def check_dtype(dtype: object) -> str:
    """`dtype` if it is one of `DTYPES`; InvalidRequestError naming `dtype` otherwise."""
    if dtype not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
    return str(dtype)


def write_merged_model(state: AdapterState, model: ModelSpec, directory: Path, dtype: str) -> None:
    """Write `model` with `state` merged in, in `dtype` ("float32" or "bfloat16", rounded to
    nearest even), into the existing `directory`: config.json, model.safetensors and the
    tokenizer files. NotFoundError (field `base_model`) when a Hugging Face base model's
    weights cannot be read."""
    try:
        base = load_base_weights(model)
    except (OSError, ValueError, KeyError) as exc:
        raise NotFoundError(
            f"base_model: cannot read the weights of {model.name} from {model.hf_path} ({exc})", field="base_model"
        ) from None
    tensors = merge_lora(model, base, state)
    config = hf_config(model, dtype, untied="lm_head.weight" in tensors and model.tie_embeddings)
    tokenizer_dir = Path(model.hf_path) if model.hf_path else Path(str(files("bios") / "data" / "tokenizer"))
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(directory / "model.safetensors", tensors, dtype)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, directory / name)


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


def hf_config(model: ModelSpec, dtype: str, untied: bool) -> dict[str, Any]:
    """The config.json of `model` as a transformers `*ForCausalLM` in `dtype`; `untied` sets
    tie_word_embeddings false. A Hugging Face base model's own config is copied and updated."""
    if model.hf_path is not None:
        config: dict[str, Any] = json.loads((Path(model.hf_path) / "config.json").read_text())
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
