"""Validation at the edge: public request types in, backend work items out.

Everything a request could get wrong is checked here, before it is queued, so that a
rejected request changes nothing. Errors are `InvalidRequestError`s naming the field, the
value and what would be valid. The engine checks requests with all of it; the HTTP transport
with the argument checks that need no model (`instance`, `datum_list`, `parse_path`, ...), so
that a bad argument raises the same error remotely before anything is sent.

Contract layer: imports NumPy and the contract layer only.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import numpy as np

from bios.backend import AdapterSpec, ForwardBackwardWork, OptimStepWork, SampleWork
from bios.catalog import ModelSpec
from bios.errors import InvalidRequestError
from bios.losses import INTEGER_INPUTS, loss_spec
from bios.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams

T = TypeVar("T")

CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SCHEME = "bios://"
MAX_TOPK = 64
"""The most top-k prompt logprobs a sample gives per position."""

KIND_DIRS = {"state": "weights", "sampler": "sampler_weights", "external": "external_weights"}
"""Checkpoint kind → the path segment that names it (`bios://SESSION/weights/NAME`)."""


def check_tokens(
    tokens: Sequence[int] | np.ndarray, model: ModelSpec, field: str, *, allow_empty: bool = False
) -> np.ndarray:
    """`tokens` as [T] int64, all in [0, V) and T <= max_seq_len (T >= 1 unless allow_empty)."""
    try:
        array = np.asarray(tokens, dtype=np.int64)
    except (OverflowError, TypeError, ValueError):
        raise InvalidRequestError(
            f"{field} must be integer token ids in 0..{model.vocab_size - 1} of {model.name}", field=field
        ) from None
    if array.size == 0 and not allow_empty:
        raise InvalidRequestError(f"{field} is empty; give at least one token", field=field)
    if array.size > model.max_seq_len:
        raise InvalidRequestError(
            f"{field} has {array.size} tokens; {model.name} accepts at most {model.max_seq_len}", field=field
        )
    bad = np.flatnonzero((array < 0) | (array >= model.vocab_size))
    if bad.size:
        raise InvalidRequestError(
            f"{field}[{bad[0]}] = {array[bad[0]]} is outside the vocabulary of {model.name} "
            f"(valid ids are 0..{model.vocab_size - 1})",
            field=field,
        )
    return array


def instance(value: object, cls: type[T], field: str) -> T:
    """`value` if it is a `cls` (a bios.types model), or the `cls` holding the same fields when
    `value` is the tinker SDK's object of that name (`from_tinker`); InvalidRequestError naming
    `field` otherwise."""
    if isinstance(value, cls):
        return value
    if type(value).__name__ == cls.__name__ and type(value).__module__.partition(".")[0] == "tinker":
        return from_tinker(value, cls, field)
    raise InvalidRequestError(f"{field} must be a bios.types.{cls.__name__}, got {type(value).__name__}", field=field)


def from_tinker(value: object, cls: type[T], field: str) -> T:
    """The `cls` with the fields of the tinker SDK's object of that name (`ModelInput`,
    `SamplingParams`, `AdamParams`, `LoraConfig`: pydantic models; `Datum`: a dataclass whose
    arrays are the SDK's `TensorData`), so that code built on the SDK's types can hand them to
    Bios's clients. A datum's provenance spans are left out, as `bios serve` leaves them out
    of the SDK's requests: no Bios loss reads them. InvalidRequestError naming the field a
    value Bios does not take (an image chunk, a field Bios lacks)."""
    sdk: Any = value
    if cls is Datum:
        fields = {
            "model_input": instance(sdk.model_input, ModelInput, f"{field}.model_input"),
            "loss_fn_inputs": {name: tensor.to_numpy() for name, tensor in sdk.loss_fn_inputs.items()},
        }
        return cast(T, Datum(**fields))
    return cast(T, cast(Any, cls).model_validate(sdk.model_dump()))


def datum_list(data: object) -> list[Datum]:
    """`data` as a non-empty list of `Datum`s (the tinker SDK's converted, `instance`);
    InvalidRequestError naming `data` or `data[i]`."""
    if not isinstance(data, (list, tuple)):
        raise InvalidRequestError(f"data must be a list of bios.types.Datum, got {type(data).__name__}", field="data")
    if not data:
        raise InvalidRequestError("data is empty; give at least one Datum", field="data")
    return [instance(datum, Datum, f"data[{i}]") for i, datum in enumerate(data)]


def sample_count(num_samples: object) -> int:
    """`num_samples` if it is an integer in [1, 128]."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 1 <= num_samples <= 128:
        raise InvalidRequestError(
            f"num_samples must be an integer in [1, 128], got {num_samples!r}", field="num_samples"
        )
    return num_samples


def config_dict(loss_fn_config: object) -> dict | None:
    """`loss_fn_config` if it is a dict or None (its entries are checked by the loss's spec)."""
    if loss_fn_config is not None and not isinstance(loss_fn_config, dict):
        raise InvalidRequestError(
            f"loss_fn_config must be a dict of setting -> number (or None), got {type(loss_fn_config).__name__}",
            field="loss_fn_config",
        )
    return loss_fn_config


def lora_adapter(adapter_id: str, model: ModelSpec, lora: LoraConfig) -> AdapterSpec:
    """The adapter a new session gets; rank must not exceed the model's `max_lora_rank`."""
    if lora.rank > model.max_lora_rank:
        raise InvalidRequestError(
            f"rank: {lora.rank} exceeds the maximum LoRA rank {model.max_lora_rank} of {model.name}", field="rank"
        )
    return AdapterSpec(
        adapter_id=adapter_id,
        base_model=model.name,
        rank=lora.rank,
        alpha=float(lora.alpha or 2 * lora.rank),
        target_modules=tuple(lora.target_modules or ()),
        dropout=lora.dropout,
        seed=lora.seed,
    )


def _datum_inputs(
    datum: Datum, index: int, needed: tuple[str, ...], optional: dict[str, float], length: int
) -> dict[str, np.ndarray]:
    where = f"data[{index}].loss_fn_inputs"
    unknown = sorted(set(datum.loss_fn_inputs) - set(needed) - set(optional))
    if unknown:
        raise InvalidRequestError(
            f"{where}.{unknown[0]} is not an input of this loss (it reads {', '.join(needed + tuple(optional))})",
            field=f"{where}.{unknown[0]}",
        )
    inputs: dict[str, np.ndarray] = {}
    for name in needed + tuple(optional):
        if name not in datum.loss_fn_inputs:
            if name in optional:
                inputs[name] = np.full(length, optional[name], dtype=np.float64)
                continue
            raise InvalidRequestError(
                f"{where}.{name} is missing; this loss needs {', '.join(needed)}", field=f"{where}.{name}"
            )
        array = datum.loss_fn_inputs[name].to_numpy()
        if array.shape != (length,):
            raise InvalidRequestError(
                f"{where}.{name} has shape {list(array.shape)}; it must have one entry per input token ({length})",
                field=f"{where}.{name}",
            )
        if name in INTEGER_INPUTS:
            if datum.loss_fn_inputs[name].dtype != "int64":
                raise InvalidRequestError(f"{where}.{name} must hold integer token ids", field=f"{where}.{name}")
        elif not np.all(np.isfinite(array)):
            raise InvalidRequestError(f"{where}.{name} holds NaN or infinity", field=f"{where}.{name}")
        inputs[name] = array.astype(np.int64 if name in INTEGER_INPUTS else np.float64)
    return inputs


def forward_work(
    adapter_id: str | None,
    model: ModelSpec,
    data: Sequence[Datum],
    loss_fn: str,
    loss_fn_config: dict[str, float] | None,
    *,
    backward: bool,
) -> ForwardBackwardWork:
    """A checked `forward`/`forward_backward` request for the backend."""
    data = datum_list(data)
    spec = loss_spec(loss_fn)
    config = spec.resolve_config(config_dict(loss_fn_config))
    tokens, inputs = [], []
    for i, datum in enumerate(data):
        ids = check_tokens(datum.model_input.to_ints(), model, f"data[{i}].model_input")
        item = _datum_inputs(datum, i, spec.required, spec.optional, len(ids))
        check_tokens(item["target_tokens"], model, f"data[{i}].loss_fn_inputs.target_tokens")
        tokens.append(ids)
        inputs.append(item)
    return ForwardBackwardWork(
        adapter_id=adapter_id,
        base_model=model.name,
        loss_fn=spec.name,
        loss_config=config,
        tokens=tuple(tokens),
        inputs=tuple(inputs),
        backward=backward,
    )


def optim_work(adapter_id: str, adam: AdamParams) -> OptimStepWork:
    """A checked `optim_step` request (AdamParams already range-checked by its model)."""
    adam = instance(adam, AdamParams, "adam_params")
    return OptimStepWork(adapter_id=adapter_id, **adam.model_dump())


def sample_work(
    adapter_id: str | None,
    model: ModelSpec,
    prompt: ModelInput,
    params: SamplingParams,
    num_samples: int,
    *,
    prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
) -> SampleWork:
    """A checked `sample` request; the prompt must leave room for one generated token, and
    `topk_prompt_logprobs` is 0 or an int in 1..min(MAX_TOPK, vocabulary)."""
    prompt = instance(prompt, ModelInput, "prompt")
    params = instance(params, SamplingParams, "sampling_params")
    sample_count(num_samples)
    ids = check_tokens(prompt.to_ints(), model, "prompt")
    if ids.size >= model.max_seq_len:
        raise InvalidRequestError(
            f"prompt has {ids.size} tokens, leaving no room to generate within {model.max_seq_len}", field="prompt"
        )
    stop_ids = params.stop_token_ids() if params.stop is not None else end_of_sequence(model)
    if stop_ids:
        check_tokens(stop_ids, model, "sampling_params.stop")
    return SampleWork(
        adapter_id=adapter_id,
        base_model=model.name,
        prompt=ids,
        num_samples=num_samples,
        max_tokens=params.max_tokens or model.max_seq_len - int(ids.size),
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        stop_token_ids=stop_ids,
        stop_strings=params.stop_strings(),
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=topk_count(topk_prompt_logprobs, model),
    )


def topk_count(k: object, model: ModelSpec) -> int:
    """A checked `topk_prompt_logprobs`: 0 (none) or an int in 1..min(MAX_TOPK, vocab_size)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= min(MAX_TOPK, model.vocab_size):
        raise InvalidRequestError(
            f"topk_prompt_logprobs: expected 0 (none) or an int from 1 to {min(MAX_TOPK, model.vocab_size)}, got {k!r}",
            field="topk_prompt_logprobs",
        )
    return k


@functools.cache
def end_of_sequence(model: ModelSpec) -> tuple[int, ...]:
    """The stop token ids of a sample that names none (`stop=None`), as in the tinker SDK: the
    model's end-of-sequence token, if its tokenizer has one. (`stop=[]` stops at nothing.)"""
    eos = model.tokenizer().eos_token_id
    return (eos,) if eos is not None and 0 <= eos < model.vocab_size else ()


def ttl_seconds(value: object) -> float | None:
    """A checkpoint's time to live: None (no expiry) or a positive, finite number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(
            f"ttl_seconds: expected a positive number of seconds or None (no expiry), got {value!r}",
            field="ttl_seconds",
        )
    return float(value)


MERGED_DTYPES = ("float32", "bfloat16")
"""Tensor dtypes of a merged Hugging Face model (external weights, `bios export --merged`)."""


def merged_dtype(value: object, kind: str) -> str | None:
    """A checked `merged`: None, or a dtype of `MERGED_DTYPES` for external weights (kind "external")."""
    if value is None:
        return None
    if value not in MERGED_DTYPES or kind != "external":
        raise InvalidRequestError(
            f"merged: expected None or one of {', '.join(MERGED_DTYPES)} when saving external weights, got {value!r}",
            field="merged",
        )
    return str(value)


def checkpoint_name(name: object) -> str:
    """A checkpoint name: 1–128 of letters, digits, '.', '_', '-', starting with a letter or digit."""
    if not isinstance(name, str) or not CHECKPOINT_NAME.match(name) or ".." in name:
        raise InvalidRequestError(
            f"name {name!r} is not a valid checkpoint name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no path separators)",
            field="name",
        )
    return name


def user_metadata(value: object) -> dict[str, str]:
    """A session's user metadata, as the tinker SDK has it: None ({}) or a dict of strings to strings."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidRequestError(
            f"user_metadata: expected a dict of strings to strings, got {value!r}", field="user_metadata"
        )
    return dict(value)


def metadata(value: object) -> dict:
    """User metadata: a JSON object of finite numbers, strings, booleans, null, lists and objects."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"metadata must be a dict, got {type(value).__name__}", field="metadata")

    def check(item: object, where: str) -> None:
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidRequestError(f"{where} is not a finite number", field=where)
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise InvalidRequestError(f"{where} has a non-string key {key!r}", field=where)
                check(sub, f"{where}.{key}")
        elif isinstance(item, (list, tuple)):
            for i, sub in enumerate(item):
                check(sub, f"{where}[{i}]")
        elif not isinstance(item, (str, int, float, bool, type(None))):
            raise InvalidRequestError(f"{where} holds a {type(item).__name__}, which is not JSON", field=where)

    def plain(item: object) -> object:  # tuples become lists, as JSON (and StateResult) has them
        if isinstance(item, dict):
            return {key: plain(sub) for key, sub in item.items()}
        if isinstance(item, (list, tuple)):
            return [plain(sub) for sub in item]
        return item

    check(value, "metadata")
    return {key: plain(sub) for key, sub in value.items()}


def parse_path(path: object) -> tuple[str, str, str]:
    """(session_id, kind, name) of a `bios://SESSION/weights|sampler_weights|external_weights/NAME` path;
    InvalidRequestError naming `path` for anything else."""
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise InvalidRequestError(f"path {path!r} is not a checkpoint path (bios://SESSION/weights/NAME)", field="path")
    parts = path[len(SCHEME) :].split("/")
    kinds = {v: k for k, v in KIND_DIRS.items()}
    if len(parts) != 3 or parts[1] not in kinds or not all(parts) or any(p.startswith(".") for p in parts):
        raise InvalidRequestError(
            f"path {path!r} is malformed; expected bios://SESSION/weights/NAME, bios://SESSION/sampler_weights/NAME "
            "or bios://SESSION/external_weights/NAME",
            field="path",
        )
    return parts[0], kinds[parts[1]], parts[2]
