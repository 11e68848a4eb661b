"""Running the recipes in examples/ from a test, in this process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_recipe(name: str, out: Path, *argv: str) -> tuple[list[dict], dict]:
    """Run examples/NAME.py's main([*argv, "--out", out]); return its metrics.jsonl rows and its
    summary.json. Asserts curves.png was drawn when matplotlib is installed."""
    module_name = f"bios_recipe_{name}"
    sys.path.insert(0, str(EXAMPLES))  # the recipes import their shared `common` module
    try:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
        module.main([*argv, "--out", str(out)])
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop(module_name, None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "curves.png").stat().st_size > 0 or importlib.util.find_spec("matplotlib") is None
    return rows, summary
