"""Where the model tests keep the real model between runs, and what they know of it."""

from __future__ import annotations

from pathlib import Path

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "models"


class Installed:
    """The fetched model directory, and the GGUF file transformers reads."""

    def __init__(self, directory: Path, gguf: Path) -> None:
        self.directory, self.gguf = directory, gguf
