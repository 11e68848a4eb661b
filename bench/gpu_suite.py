"""The GPU suite: one run that measures LoRA training, decoding, compilation and the kernels
they rest on, prints a table and writes it as JSON.

    python bench/gpu_suite.py --profile cpu-tiny --out /tmp/suite.json      # anywhere, < 1 min warm
    python bench/gpu_suite.py --out suite.json                              # on one H100/H200, < 8 min

Sections (bench/sections.py; sizes, steps and time budgets from the profile, `gpu` by default
where an NVIDIA device is present, else `cpu-tiny`):

- `kernels`: the device's measured matmul and copy rates; cuDNN against XLA attention; LoRA by
  `jax.lax.ragged_dot` over 1 and 8 adapters against the dense matmul of the same work and a
  gather + batched matmul of the active slots, each with its verdict.
- `train/<model>`: LoRA rank-32 (all linear layers) training steps of a 1B- and an 8B-class
  Llama (random bf16 weights drawn on the device), rows x 2048 tokens, by 1 adapter and by
  8 sessions whose requests batch into one device call: tokens/s, MFU (bios/accounting.py),
  first-step (cold compile) time, recompiles while timed (must be 0), backend calls per step.
- `compile/<model>`: the first step again in a fresh process, its programs from JAX's
  persistent cache (warm), beside the cold first step.
- `decode/<model>`: greedy decoding of 1, 64 and 256 rows: tokens/s and HBM bandwidth use.

Each section runs in its own process under its time budget (and the suite's limit), so one
that runs out of memory, crashes or overruns is recorded with its error and the suite goes on;
rows measured before the failure are kept. The parent process never touches the device.

On a GPU machine without network (one H100/H200 with Python 3.12, jax with CUDA, torch,
transformers, Jinja2, tokenizers, safetensors, optax, but no pydantic): the checkout is copied
there and run from its root, not installed (so the backend is named by its factory,
bench/presets.py). What `bios` imports that such a machine lacks is pydantic and its needs;
they go with the checkout as wheels in `.whl/` (2.8 MB; the versions the tests here run with;
typing-extensions too, as pydantic needs >= 4.16). The suite imports neither gguf nor orbax.
Here, once, in the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0

then, there, with `.whl/` copied along and a 600 s limit (the gpu profile stops itself at 470 s):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; \
    python3 bench/gpu_suite.py --profile gpu --cache-dir /tmp/bios-jax-cache --out $OUT/gpu_suite.json

Progress lines come as sections end, the table last; the JSON and every section's output
(`$OUT/gpu_suite.log`) are left in $OUT. To rerun some sections at once on the same
machine (its persistent cache then warm): `--sections train/llama-8b,decode/llama-8b`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from profiles import PROFILES, Profile
from report import table

MIN_SECTION_S = 20.0
"""A section is skipped when less than this is left of the suite's time limit."""


def default_profile() -> str:
    """`gpu` where an NVIDIA device node exists (checked without starting JAX on it), else `cpu-tiny`."""
    return "gpu" if glob.glob("/dev/nvidia[0-9]*") else "cpu-tiny"


def run_section(profile: Profile, section: str, cache_dir: str, timeout: float, log: list[str]) -> dict[str, Any]:
    """`section` in a child process limited to `timeout` seconds: its result (bench/sections.py)
    with `seconds` and `error` (None when it finished cleanly). Its output is appended to `log`."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "result.json"
        command = [sys.executable, __file__, "--profile", profile.name, "--cache-dir", cache_dir]
        command += ["--section", section, "--result", str(path)]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            output, error = done.stdout + done.stderr, None if done.returncode == 0 else f"exit code {done.returncode}"
        except subprocess.TimeoutExpired as expired:
            output, error = _text(expired.stdout) + _text(expired.stderr), f"timed out after {timeout:.0f} s"
        seconds = time.perf_counter() - started
        result: dict[str, Any] = json.loads(path.read_text()) if path.exists() and path.stat().st_size else {}
    log.append(f"===== {section} ({seconds:.1f} s)\n{output}")
    detail = result.get("error") or output.strip()[-600:]
    if error is not None and detail:
        error = f"{error}: {detail}"
    return {"rows": [], **result, "seconds": seconds, "budget_s": profile.budget(section), "error": error}


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def compile_summary(train: dict[str, Any], warm: dict[str, Any], cache_entries: int) -> None:
    """Put the first step of `train` (its first case, which compiled) beside the warm one of
    `warm`, with a verdict; the first is cold only if the cache was empty (`cache_entries` 0)."""
    cold_rows = [row for row in train["rows"] if "compile_s" in row][:1]
    warm_rows = [row for row in warm["rows"] if "compile_s" in row][:1]
    if not cold_rows:
        return
    cold = {k: cold_rows[0][k] for k in ("first_step_s", "new_programs", "compile_s", "step_ms")}
    label = "cold start (empty cache)" if cache_entries == 0 else f"first start (cache had {cache_entries} entries)"
    warm["rows"].insert(0, {"case": label, **cold})
    if warm_rows:
        cold_s, warm_s = cold["compile_s"], warm_rows[0]["compile_s"]
        ratio = f"{cold_s / warm_s:.1f}x less" if warm_s > 0 else "none left"
        verdict = f"first-step overhead {cold_s:.1f} s at first start, {warm_s:.1f} s warm: {ratio}"
        warm["rows"].append({"case": "verdict", "verdict": verdict})


def suite(profile: Profile, sections: list[str], cache_dir: str, time_limit: float) -> tuple[dict[str, Any], str]:
    """Run `sections` one after another within `time_limit` seconds; (the report, the logs)."""
    started = time.perf_counter()
    entries = len(os.listdir(cache_dir))
    report: dict[str, Any] = {"profile": profile.name, "cache_dir": cache_dir, "cache_entries_at_start": entries}
    report |= {"time_limit_s": time_limit, "device": None, "sections": {}}
    log: list[str] = []
    for section in sections:
        left = time_limit - (time.perf_counter() - started)
        if left < MIN_SECTION_S:
            report["sections"][section] = {"rows": [], "seconds": 0.0, "budget_s": profile.budget(section)} | {
                "error": f"skipped: {left:.0f} s left of the suite's {time_limit:.0f} s"
            }
            continue
        result = run_section(profile, section, cache_dir, min(profile.budget(section), left), log)
        report["device"] = result.pop("device", None) or report["device"]
        report["sections"][section] = result
        status = "ok" if result["error"] is None else f"ERROR {result['error'][:100]}"
        print(f"[{time.perf_counter() - started:6.1f} s] {section}: {result['seconds']:.1f} s, {status}", flush=True)
    first = profile.train_models[0]
    if f"train/{first}" in report["sections"] and f"compile/{first}" in report["sections"]:
        compile_summary(report["sections"][f"train/{first}"], report["sections"][f"compile/{first}"], entries)
    report["total_s"] = time.perf_counter() - started
    return report, "\n".join(log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: gpu if present")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here (logs beside it)")
    parser.add_argument("--cache-dir", default=None, help="JAX's persistent cache (default: a new, empty one)")
    parser.add_argument("--sections", default=None, help="comma-separated subset of the profile's sections")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds (default: the profile's)")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # a child process: run one section
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    profile = PROFILES[args.profile or default_profile()]
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bios-suite-cache-")
    if args.section is not None:
        from sections import run  # the child imports JAX; the parent never does

        run(profile, args.section, cache_dir, args.result)
        return
    sections = args.sections.split(",") if args.sections else profile.sections()
    unknown = sorted(set(sections) - set(profile.sections()))
    if unknown:
        parser.error(f"--sections: {unknown} not in the {profile.name} profile's {profile.sections()}")
    os.makedirs(cache_dir, exist_ok=True)
    report, log = suite(profile, sections, cache_dir, args.time_limit or profile.time_limit_s)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1, allow_nan=True))
        args.out.with_suffix(".log").write_text(log)
    print(table(report))


if __name__ == "__main__":
    main()
