"""Hugging Face PEFT LoRA adapters: Bios adapters written as, and read from, PEFT directories.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors`. Names and
layouts (letters as in docs/shapes.md; `in`/`out` are the linear layer's widths):

    Bios (math layout)                                PEFT (torch layout, `base_model.model.` + ...)
    model.layers.{i}.self_attn.q_proj.lora_A [in, R]  model.layers.{i}.self_attn.q_proj.lora_A.weight [R, in]  = Aᵀ
    model.layers.{i}.self_attn.q_proj.lora_B [R, out] model.layers.{i}.self_attn.q_proj.lora_B.weight [out, R] = Bᵀ
    lm_head.lora_A [D, R] / lm_head.lora_B [R, V]     lm_head.lora_A.weight [R, D] / lm_head.lora_B.weight [V, R]

Both add `(lora_alpha / r) · x A B` to a layer's output. Only plain LoRA maps onto Bios: a setting
that changes the computation beyond that (rsLoRA, DoRA, per-module ranks or alphas, trained
biases, a subset of layers, extra trained modules, ...) is rejected with an InvalidRequestError
naming it, never dropped. Files are written in float32; F32, F16, BF16 and F64 are read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bios.backend import AdapterState
from bios.catalog import ModelSpec
from bios.errors import InvalidRequestError
from bios.types import LoraConfig
from bios.types.params import ALL_MODULES
from bios.weights import generate_base_weights, lora_shapes, module_path

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
"""`init_lora_weights` values that leave the base model as it is (others, e.g. PiSSA, change it)."""
_INERT = {
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "init_lora_weights",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "runtime_config",
    "eva_config",
}
"""Keys read below or without effect on the computation; every other key must be unset (None, false, empty)."""
_REASONS = {
    "use_rslora": "rsLoRA scales by lora_alpha / sqrt(r); Bios scales by lora_alpha / r",
    "use_dora": "DoRA's magnitude vectors",
    "fan_in_fan_out": "transposed (Conv1D) base weights",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "lora_bias": "a trained bias on lora_B",
    "layers_to_transform": "adapters on a subset of layers",
    "layers_pattern": "adapters on a subset of layers",
    "modules_to_save": "fully trained extra modules",
    "exclude_modules": "excluded modules",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained embedding rows",
}


def is_local_directory(path: object) -> bool:
    """Whether `path` (str or PathLike, not a `bios://` path) names an existing local directory."""
    return isinstance(path, (str, os.PathLike)) and not str(path).startswith("bios://") and os.path.isdir(path)


def write_peft_adapter(state: AdapterState, model: ModelSpec, directory: Path) -> None:
    """Write `state`'s weights (math layout, keyed like `bios.weights.lora_shapes`) as a PEFT LoRA
    adapter of `model` into `directory` (created): A [in, R] → lora_A.weight [R, in], B [R, out] →
    lora_B.weight [out, R], float32. The seed and the optimizer state are not part of PEFT's format."""
    spec = state.spec
    expected = lora_shapes(model, spec.target_modules, spec.rank)
    if spec.base_model != model.name or {k: tuple(v.shape) for k, v in state.weights.items()} != expected:
        raise ValueError(
            f"adapter {spec.adapter_id} does not match {model.name} with {spec.target_modules} at rank {spec.rank}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{PREFIX}{name}.weight": np.ascontiguousarray(value.T, dtype=np.float32)
        for name, value in sorted(state.weights.items())
    }
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else float(spec.alpha)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.hf_path or model.name,
        "r": spec.rank,
        "lora_alpha": alpha,
        "target_modules": list(spec.target_modules),
        "lora_dropout": spec.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_peft_adapter(directory: Path, model: ModelSpec) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """The adapter in PEFT directory `directory` as a LoraConfig (seed 0) and float32 weights keyed
    like `bios.weights.lora_shapes` in math layout (A [in, R], B [R, out]), checked against `model`.

    Raises InvalidRequestError (field `path`, `adapter_config.KEY` or `adapter_model.TENSOR`) for a
    missing or unreadable file, a setting Bios cannot honour, or a tensor missing, extra or misshapen.
    """
    directory = Path(directory)
    config = _read_config(directory)
    _check_settings(config)
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _bad("r", rank, "the rank must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise _bad("lora_alpha", alpha, "lora_alpha must be a positive number")
    modules = _target_modules(config.get("target_modules"), model)
    expected = lora_shapes(model, modules, rank)
    weights: dict[str, np.ndarray] = {}
    for key, value in _read_tensors(directory / WEIGHTS_FILE).items():
        name = key.removeprefix(PREFIX).removesuffix(".weight")
        if key == f"{PREFIX}lm_head.base_layer.weight" and "lm_head" in modules:
            _check_base_copy(value, model)  # PEFT saves the untouched unembedding with an lm_head adapter
            continue
        if not key.startswith(PREFIX) or not key.endswith(".weight") or name not in expected:
            raise InvalidRequestError(
                f"{WEIGHTS_FILE}: tensor {key!r} is not a LoRA factor of {modules} on {model.name} "
                f"(expected names like {PREFIX}{next(iter(expected))}.weight)",
                field=f"adapter_model.{key}",
            )
        if value.T.shape != expected[name]:
            raise InvalidRequestError(
                f"{WEIGHTS_FILE}: {key} has shape {list(value.shape)}; rank {rank} on {model.name} needs "
                f"{list(expected[name][::-1])}",
                field=f"adapter_model.{key}",
            )
        weights[name] = np.ascontiguousarray(value.T)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise InvalidRequestError(
            f"{WEIGHTS_FILE} lacks {len(missing)} tensors of its target_modules, e.g. {PREFIX}{missing[0]}.weight",
            field=f"adapter_model.{PREFIX}{missing[0]}.weight",
        )
    dropout = config.get("lora_dropout", 0.0)
    try:
        lora = LoraConfig(rank=rank, alpha=float(alpha), target_modules=modules, dropout=dropout)
    except InvalidRequestError as exc:
        key = {"LoraConfig.rank": "r", "LoraConfig.alpha": "lora_alpha", "LoraConfig.dropout": "lora_dropout"}.get(
            exc.field or "", exc.field or ""
        )
        raise InvalidRequestError(f"{CONFIG_FILE}: {key}: {exc.message}", field=f"adapter_config.{key}") from None
    return lora, weights


def _bad(key: str, value: object, reason: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{CONFIG_FILE}: {key} = {value!r} is not supported: {reason}", field=f"adapter_config.{key}"
    )


def _read_config(directory: Path) -> dict[str, Any]:
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / file).is_file():
            raise InvalidRequestError(
                f"path: {directory} has no {file}; a PEFT LoRA adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}",
                field="path",
            )
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"path: cannot read {directory / CONFIG_FILE} ({exc})", field="path") from None
    if not isinstance(config, dict):
        raise InvalidRequestError(f"path: {directory / CONFIG_FILE} is not a JSON object", field="path")
    return config


def _check_settings(config: dict[str, Any]) -> None:
    """Reject every setting that would make the adapter compute something other than plain LoRA."""
    if config.get("peft_type") != "LORA":
        raise _bad("peft_type", config.get("peft_type"), "Bios reads LoRA adapters (peft_type LORA) only")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise _bad("task_type", config.get("task_type"), "Bios trains causal language models (CAUSAL_LM)")
    if config.get("bias", "none") != "none":
        raise _bad("bias", config.get("bias"), "Bios trains no biases (bias must be 'none')")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise _bad(
            "init_lora_weights",
            config["init_lora_weights"],
            "this initialisation changes the base weights; "
            "convert the adapter to plain LoRA first (PEFT's path_initial_model_for_weight_conversion)",
        )
    for key, value in config.items():
        if key not in _INERT and value not in (None, False, {}, [], ""):
            raise _bad(key, value, f"Bios runs plain LoRA ({_REASONS.get(key, 'a setting Bios does not implement')})")


def _target_modules(targets: object, model: ModelSpec) -> tuple[str, ...]:
    """Bios module names that PEFT's `target_modules` (names matched as path suffixes, or one
    regex matched against whole paths) selects in `model`; every layer of each, or an error."""
    paths = {
        module_path(layer, m): m
        for m in model.linear_shapes()
        for layer in ([None] if m == "lm_head" else range(model.n_layers))
    }
    if targets == "all-linear":
        targets = [m for m in model.linear_shapes() if m != "lm_head"]
    if isinstance(targets, str):
        try:
            matched = {p for p in paths if re.fullmatch(targets, p)}
        except re.error as exc:
            raise _bad("target_modules", targets, f"it is not a valid regular expression ({exc})") from None
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        matched = set()
        for target in targets:
            hits = {p for p in paths if p == target or p.endswith(f".{target}")}
            if not hits:
                raise _bad("target_modules", target, f"Bios adapts only {', '.join(ALL_MODULES)} of {model.name}")
            matched |= hits
    else:
        raise _bad("target_modules", targets, "give a non-empty list of module names")
    if not matched:
        raise _bad("target_modules", targets, f"it selects none of {', '.join(ALL_MODULES)} in {model.name}")
    modules = {paths[p] for p in matched}
    for module in modules:
        if {p for p in matched if paths[p] == module} != {p for p, m in paths.items() if m == module}:
            raise _bad("target_modules", targets, f"it selects {module} in some layers only; Bios adapts every layer")
    return tuple(m for m in ALL_MODULES if m in modules)


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32, parsed here because numpy cannot read BF16."""
    try:
        raw = file.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header = {
            k: (v["dtype"], v["shape"], *v["data_offsets"])
            for k, v in json.loads(raw[8 : 8 + size]).items()
            if k != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequestError(f"path: cannot read {file} as safetensors ({exc})", field="path") from None
    tensors = {}
    for key, (dtype, shape, start, end) in header.items():
        data = raw[8 + size + start : 8 + size + end]
        if dtype not in (*_DTYPES, "BF16"):
            raise InvalidRequestError(
                f"{file}: tensor {key} is {dtype}; expected F32, F16, BF16 or F64", field=f"adapter_model.{key}"
            )
        array = (
            (np.frombuffer(data, "<u2").astype("<u4") << 16).view("<f4")
            if dtype == "BF16"
            else np.frombuffer(data, _DTYPES[dtype])
        )
        if array.size != int(np.prod(shape)):
            raise InvalidRequestError(f"path: {file} is truncated or corrupt at tensor {key}", field="path")
        tensors[key] = array.astype(np.float32).reshape(shape)
    return tensors


def _check_base_copy(value: np.ndarray, model: ModelSpec) -> None:
    """PEFT's copy of the unembedding [V, D] must be the served model's (within BF16 rounding)."""
    name = "model.embed_tokens.weight" if model.tie_embeddings else "lm_head.weight"
    if model.hf_path is None:
        base = generate_base_weights(model)[name]
    else:
        base = None
        for file in sorted(Path(model.hf_path).glob("*.safetensors")):
            with safe_open(str(file), framework="numpy") as handle:
                if name in handle.keys():  # noqa: SIM118 - a safetensors handle is not a container
                    base = np.asarray(handle.get_tensor(name), dtype=np.float32)
    if base is None or value.shape != base.shape or not np.allclose(value, base, rtol=2**-7, atol=1e-6):
        raise InvalidRequestError(
            f"{WEIGHTS_FILE}: {PREFIX}lm_head.base_layer.weight (PEFT's copy of the base unembedding) differs from "
            f"{model.name}'s; the adapter was trained on another base model",
            field=f"adapter_model.{PREFIX}lm_head.base_layer.weight",
        )
