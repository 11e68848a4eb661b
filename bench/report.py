"""The GPU suite's report as a text table: one block per section, one line per case, its
verdict or error under it."""

from __future__ import annotations

from typing import Any

FIGURES = (  # (key, label, format) in the order they are shown
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("hbm_util", "HBM", "{:.1%}"),
    ("model_tflops", "TFLOP/s", "{:.3g}"),
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("gb_per_s", "GB/s", "{:.3g}"),
    ("step_ms", "step ms", "{:.3g}"),
    ("ms", "ms", "{:.3g}"),
    ("fwd_ms", "fwd ms", "{:.3g}"),
    ("fwd_bwd_ms", "fwd+bwd ms", "{:.3g}"),
    ("x_dense", "x dense", "{:.2f}"),
    ("rel_err", "rel err", "{:.1e}"),
    ("prefill_ms", "prefill ms", "{:.3g}"),
    ("first_step_s", "first step s", "{:.3g}"),
    ("new_programs", "new programs", "{}"),
    ("compile_s", "compile s", "{:.3g}"),
    ("warmup_s", "warm-up s", "{:.3g}"),
    ("recompiles", "recompiles", "{}"),
    ("backend_calls_per_step", "backend calls/step", "{:.3g}"),
)
CASE_WIDTH = 44


def figures(row: dict[str, Any]) -> str:
    """The row's figures as `label value` pairs; n/a for a figure the device cannot give."""
    shown = []
    for key, label, form in FIGURES:
        if key in row:
            shown.append(f"{label} {'n/a' if row[key] is None else form.format(row[key])}")
    return "  ".join(shown)


def table(report: dict[str, Any]) -> str:
    """The whole report (gpu_suite.py's JSON) as text."""
    device = report.get("device") or {}
    lines = [
        f"profile {report['profile']} on {device.get('count', '?')} x {device.get('kind', '?')} "
        f"(jax {device.get('jax', '?')}); {report['total_s']:.0f} s of {report['time_limit_s']:.0f} s; "
        f"compilation cache {report['cache_dir']} ({report['cache_entries_at_start']} entries at start)"
    ]
    for name, section in report["sections"].items():
        model = section.get("model", {})
        about = f"  [{model['name']}, {model['params_b']:.2f} B params]" if model else ""
        lines.append(f"== {name}: {section['seconds']:.1f} s of {section['budget_s']:.0f} s{about}")
        if section["error"]:
            lines.append(f"   ERROR {section['error']}")
        for row in section["rows"]:
            lines.append(f"   {row['case']:<{CASE_WIDTH}} {figures(row)}".rstrip())
            if row.get("verdict"):
                lines.append(f"   -> {row['verdict']}")
            elif row.get("error"):
                lines.append(f"      ERROR {row['error']}")
    return "\n".join(lines)
