"""The GPU suite's sections: what each measures, in a process of its own.

A section is `kernels`, `train/<model>`, `compile/<model>` or `decode/<model>` (models are
bench/presets.py names). `run` measures one and writes its result as JSON to a file after
every row, so that what was measured survives a section that is later killed or crashes:

    {"device": {...}, "rows": [{"case": ..., figures..., "verdict"?: ..., "error"?: ...}], "error"?: ...}

A case that fails (out of memory, a kernel that does not exist here) records its error in its
row and the section goes on with the next case.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import kernel_checks
import numpy as np
from presets import open_model
from profiles import Profile
from workloads import (
    decode_prompts,
    decoding_figures,
    random_data,
    time_decoding,
    time_training,
    training_figures,
)

from backends.jax import compiled

Row = dict[str, Any]


def device() -> dict[str, Any]:
    """What this process computes on."""
    first = jax.devices()[0]
    return {"platform": first.platform, "kind": first.device_kind, "count": len(jax.devices()), "jax": jax.__version__}


class Recorder:
    """A section's result, rewritten to `path` as JSON whenever it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.result: dict[str, Any] = {"rows": []}
        self._write()

    def add(self, rows: Iterable[Row]) -> None:
        self.result["rows"].extend(rows)
        self._write()

    def set(self, key: str, value: Any) -> None:
        self.result[key] = value
        self._write()

    def _write(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.result, indent=1, default=float))
        partial.replace(self.path)  # whole or not at all, should the process be killed meanwhile


def case(name: str, measure: Callable[[], Row]) -> Row:
    """The row of `name`: `measure()`'s figures, or the error it raised."""
    try:
        return {"case": name} | measure()
    except Exception as error:  # noqa: BLE001 - a failed case is recorded and the section goes on
        return kernel_checks.failure(name, error) | {"trace": traceback.format_exc(limit=-3)[-1500:]}


def run(profile: Profile, section: str, cache_dir: str, result: Path) -> None:
    """Measure `section` of `profile`, keeping compiled programs in `cache_dir`; the result
    goes to `result` (see the module docstring). An error outside any case is recorded as the
    section's `error` and raised again."""
    recorder = Recorder(result)
    try:
        recorder.set("device", device())
        kind, _, model = section.partition("/")
        if kind == "kernels":
            _kernels(profile, cache_dir, recorder)
        elif kind in ("train", "compile"):
            _train(profile, model, cache_dir, recorder, warm=kind == "compile")
        elif kind == "decode":
            _decode(profile, model, cache_dir, recorder)
        else:
            raise ValueError(f"unknown section {section!r}; the profile has {profile.sections()}")
    except Exception as error:
        recorder.set("error", f"{type(error).__name__}: {str(error)[:500]}")
        raise


def _kernels(profile: Profile, cache_dir: str, recorder: Recorder) -> None:
    compiled.use_persistent_cache(cache_dir)
    checks: list[tuple[str, Callable[[], list[Row]]]] = [
        (
            "ceilings",
            lambda: kernel_checks.ceilings(profile.matmul, profile.copy_elements, profile.dtype, profile.loop),
        ),
        ("attention", lambda: kernel_checks.attention_check(profile.attention, profile.dtype, profile.loop)),
    ]
    groups = (1, max(profile.adapters))
    for dtype in profile.lora_dtypes:
        checks.append(
            (f"lora {dtype}", lambda d=dtype: kernel_checks.ragged_check(profile.lora, groups, d, profile.loop))
        )
    for name, check in checks:
        try:
            recorder.add(check())
        except Exception as error:  # noqa: BLE001 - e.g. out of memory for its inputs; the next check runs
            recorder.add([kernel_checks.failure(name, error)])


def _options(profile: Profile, cache_dir: str, **more: str) -> dict[str, str]:
    return {"compilation_cache_dir": cache_dir, "slots": str(profile.slots), **more}


def _train(profile: Profile, model: str, cache_dir: str, recorder: Recorder, warm: bool) -> None:
    """Each adapter count of the profile (`warm`: only the first, in this fresh process, its
    programs from the persistent cache that the train section filled)."""
    service, spec = open_model(model, profile.dtype, rank=profile.rank, **_options(profile, cache_dir))
    about = {"rows": profile.rows, "length": profile.length, "rank": profile.rank, "dtype": profile.dtype}
    recorder.set("model", {"name": spec.name, "params_b": spec.n_params / 1e9, **about})
    counts = profile.adapters[:1] if warm else profile.adapters
    clients = [service.create_lora_training_client(spec.name, rank=profile.rank) for _ in range(max(counts))]
    rng = np.random.default_rng(0)
    for count in counts:

        def measure(count: int = count) -> Row:
            data = [random_data(spec, profile.rows // count, profile.length, rng) for _ in range(count)]
            timing = time_training(service, clients[:count], data, profile.steps)
            overhead = {"compile_s": timing.first_step_s - timing.step_s} if timing.new_programs else {}
            return {
                "first_step_s": timing.first_step_s,
                "new_programs": timing.new_programs,
                **overhead,
                "step_ms": timing.step_s * 1e3,
                **training_figures(spec, timing, profile.rows, profile.length, profile.rank),
                "recompiles": timing.recompiles,
                "backend_calls_per_step": timing.backend_calls_per_step,
            }

        label = "warm start (fresh process, persistent cache)" if warm else f"{count} adapter{'s' * (count > 1)}"
        recorder.add([case(label, measure)])


def _decode(profile: Profile, model: str, cache_dir: str, recorder: Recorder) -> None:
    rows = max(profile.decode_rows)
    service, spec = open_model(
        model, profile.dtype, rank=profile.rank, **_options(profile, cache_dir, decode_rows=str(rows))
    )
    about = {"prompt_length": profile.prompt_length, "max_tokens": profile.max_tokens, "dtype": profile.dtype}
    recorder.set("model", {"name": spec.name, "params_b": spec.n_params / 1e9, **about})
    sampler = service.create_sampling_client(base_model=spec.name)
    weight_bytes = service.transport.backend.dtype.itemsize
    context = profile.prompt_length + profile.max_tokens // 2  # mean positions each row attends to
    rng = np.random.default_rng(0)
    for batch in profile.decode_rows:

        def measure(batch: int = batch) -> Row:
            prompts, samples = decode_prompts(spec, batch, profile.prompt_length, rng)
            timing = time_decoding(service, sampler, prompts, samples, profile.max_tokens)
            return {
                "warmup_s": timing.warmup_s,
                "prefill_ms": timing.prefill_s * 1e3,
                "step_ms": timing.decode_step_s * 1e3,
                **decoding_figures(spec, timing, context, weight_bytes),
                "recompiles": timing.recompiles,
            }

        recorder.add([case(f"batch {batch}", measure)])
