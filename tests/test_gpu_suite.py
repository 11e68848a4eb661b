"""bench/gpu_suite.py end to end on its CPU profile: every section measured, figures finite and
positive where the CPU can give them, no recompiles in steady state, sessions batched into
one device call; and a failing section is recorded while the suite goes on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.py"
SECTIONS = ["kernels", "train/tiny-a", "compile/tiny-a", "train/tiny-b", "decode/tiny-b"]


def _run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(out.parent / "cache")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, str(SUITE), "--profile", "cpu-tiny", "--out", str(out), "--cache-dir", cache, *args]
    environment = os.environ | {"PYTHONPATH": path, "BIOS_HOME": str(out.parent / "home")} | env
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    done = _run(out)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text()), done.stdout


def _rows(report: dict[str, Any], section: str) -> dict[str, dict[str, Any]]:
    return {row["case"]: row for row in report["sections"][section]["rows"]}


def _positive(row: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_every_section_runs_cleanly_within_its_budget(suite: tuple[dict[str, Any], str]) -> None:
    report, stdout = suite
    assert list(report["sections"]) == SECTIONS
    assert report["device"]["platform"] == "cpu"
    for name, section in report["sections"].items():
        assert section["error"] is None, (name, section["error"])
        assert section["rows"] and 0 < section["seconds"] <= section["budget_s"] + 5
        assert name in stdout  # the table
    assert (Path(report["cache_dir"])).is_dir() and report["total_s"] <= report["time_limit_s"] + 5


@pytest.mark.parametrize("section", ["train/tiny-a", "train/tiny-b"])
def test_training_cases_batch_sessions_and_never_recompile(suite: tuple[dict[str, Any], str], section: str) -> None:
    rows = _rows(suite[0], section)
    assert list(rows) == ["1 adapter", "8 adapters"]
    for row in rows.values():
        _positive(row, "tokens_per_s", "model_tflops", "step_ms", "first_step_s")
        assert row["recompiles"] == 0
        # all sessions' forward_backward and optim_step, queued together, in one fused call
        assert row["backend_calls_per_step"] == 1.0
        assert row["mfu"] is None  # no peak figure for a CPU
    assert rows["1 adapter"]["new_programs"] >= 2 and math.isfinite(rows["1 adapter"]["compile_s"])
    # 8 active adapters are another bucket of the active-slot count: programs of their own, compiled once
    assert rows["8 adapters"]["new_programs"] >= 1
    one, eight = rows["1 adapter"], rows["8 adapters"]
    assert one["model_tflops"] / one["tokens_per_s"] == pytest.approx(eight["model_tflops"] / eight["tokens_per_s"])


def test_compile_section_puts_the_warm_start_beside_the_first(suite: tuple[dict[str, Any], str]) -> None:
    rows = suite[0]["sections"]["compile/tiny-a"]["rows"]
    first, warm, verdict = rows
    assert first["case"].startswith(("cold start", "first start")) and warm["case"].startswith("warm start")
    _positive(first, "first_step_s", "compile_s")
    _positive(warm, "first_step_s", "tokens_per_s")
    assert warm["new_programs"] >= 2 and warm["recompiles"] == 0
    assert "warm" in verdict["verdict"]


def test_decode_cases_give_throughput_and_bandwidth(suite: tuple[dict[str, Any], str]) -> None:
    rows = _rows(suite[0], "decode/tiny-b")
    assert list(rows) == ["batch 1", "batch 4", "batch 16"]
    for row in rows.values():
        _positive(row, "prefill_ms", "warmup_s")
        # The step is a difference of two wall times: on a tiny model under load it may be <= 0.
        for key in ("tokens_per_s", "gb_per_s", "step_ms"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)
        assert row["recompiles"] == 0 and row["hbm_util"] is None


def test_kernel_checks_give_verdicts(suite: tuple[dict[str, Any], str]) -> None:
    rows = _rows(suite[0], "kernels")
    _positive(rows["matmul 256^3 float32"], "tflops", "ms")
    _positive(rows["copy 4 MiB"], "gb_per_s", "ms")
    _positive(rows["attention xla"], "fwd_ms", "fwd_bwd_ms", "tflops")
    assert rows["attention cudnn"]["verdict"].startswith("cuDNN attention does not run here")
    for case in ("ragged_dot, 1 adapter", "gather+bmm, 1 adapter", "ragged_dot, 8 adapters", "gather+bmm, 8 adapters"):
        _positive(rows[f"lora float32 {case}"], "ms", "x_dense")
    assert rows["lora float32 ragged_dot, 8 adapters"]["rel_err"] < 1e-5  # both compute the same deltas
    assert rows["lora float32 verdict"]["verdict"].startswith("ragged_dot ")


def test_a_failing_section_is_recorded_and_the_suite_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    done = _run(out, "--sections", "kernels,decode/tiny-b", JAX_PLATFORMS="no-such-platform")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert list(report["sections"]) == ["kernels", "decode/tiny-b"]
    for section in report["sections"].values():
        assert section["error"].startswith("exit code 1: ") and "no-such-platform" in section["error"]
    assert "ERROR exit code 1" in done.stdout
    assert "===== kernels" in out.with_suffix(".log").read_text()
