"""docs/tinker-compat.md cannot drift: its tables list exactly the tinker SDK's public surface
(read from the pinned release in a child process), and every status it gives is true of Bios."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tinker_sdk import REPO, sdk_directory

import bios
import bios.types

DOC = REPO / "docs" / "tinker-compat.md"
STATUSES = {"same", "different", "other", "missing"}
BIOS_SIDE: dict[str, tuple[object, ...]] = {
    "tinker.ServiceClient": (bios.ServiceClient,),
    "tinker.TrainingClient": (bios.TrainingClient,),
    "tinker.SamplingClient": (bios.SamplingClient,),
    "tinker.RestClient": (bios.RestClient,),
    "tinker.APIFuture": (bios.BiosFuture,),
    "tinker": (bios, bios.types),
    "tinker.types": (bios.types,),
}
"""Where each section's names are looked for in Bios."""

ROW = re.compile(r"^\| `(?P<name>[^`]+)` \| (?P<status>\w+) \| (?P<note>.*) \|$")


@pytest.fixture(scope="module")
def sdk_surface() -> dict[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(sdk_directory("0.38.0")), "HF_HUB_OFFLINE": "1"}
    script = Path(__file__).parent / "support" / "tinker_surface.py"
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def documented() -> dict[str, dict[str, tuple[str, str]]]:
    """Section → name → (status, note), from the page's tables."""
    sections: dict[str, dict[str, tuple[str, str]]] = {}
    current: dict[str, tuple[str, str]] | None = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## `"):
            current = sections.setdefault(line.removeprefix("## `").removesuffix("`"), {})
        elif current is not None and (row := ROW.match(line)):
            assert row["name"] not in current, f"{row['name']} is listed twice"
            current[row["name"]] = (row["status"], row["note"].strip())
    return sections


def _in_bios(section: str, name: str) -> bool:
    return any(hasattr(owner, name) for owner in BIOS_SIDE[section])


def _resolves(dotted: str) -> bool:
    """Whether `bios.x.Y` (a module path, then attributes) names something."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def test_the_page_lists_exactly_the_sdks_public_surface(sdk_surface: dict[str, list[str]]) -> None:
    pages = documented()
    assert set(pages) == set(sdk_surface) == set(BIOS_SIDE)
    for section, names in sdk_surface.items():
        assert sorted(pages[section]) == sorted(names), section


def test_every_status_on_the_page_is_true_of_bios() -> None:
    wrong = []
    for section, rows in documented().items():
        for name, (status, note) in rows.items():
            where = f"{section}.{name}: {status}"
            if status not in STATUSES:
                wrong.append(f"{where} is not one of {sorted(STATUSES)}")
            elif status in ("same", "different") and not _in_bios(section, name):
                wrong.append(f"{where}, but Bios has no {name}")
            elif status == "missing" and _in_bios(section, name):
                wrong.append(f"{where}, but Bios has {name}: say what it does")
            elif status in ("different", "other") and not note:
                wrong.append(f"{where} needs a note")
            elif status == "other" and not _resolves(note.split("`")[1]):
                wrong.append(f"{where}: {note.split('`')[1]} does not exist")
    assert not wrong, "\n".join(wrong)
