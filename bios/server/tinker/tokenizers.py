"""Local tokenizer directories that the SDK's `get_tokenizer()` loads with `transformers`.

The SDK never downloads a tokenizer over the Tinker API: it calls
`AutoTokenizer.from_pretrained(get_info().model_data.tokenizer_id)`. Bios therefore writes each
base model's tokenizer (`tokenizer.json` + `tokenizer_config.json`, from `Tokenizer.to_wire()`)
into a directory under the server's home and reports that absolute path, which loads offline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from bios.errors import BackendError
from bios.tokenizer import Tokenizer


def tokenizer_directory(root: Path, base_model: str, tokenizer: Tokenizer) -> Path:
    """The directory under `root` holding `base_model`'s `tokenizer`, written on first use.

    The SDK cuts a tokenizer id at its first `:`, so the path may not contain one."""
    directory = Path(root).resolve() / base_model.replace("/", "--").replace(":", "-")
    if ":" in str(directory):
        raise BackendError(
            f"the tokenizer directory {directory} contains ':', which "
            "the Tinker SDK cannot load; serve from a home without ':'"
        )
    if (directory / "tokenizer_config.json").is_file():
        return directory
    wire = tokenizer.to_wire()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **(wire["config"] or {})}
    if wire.get("chat_template"):
        config["chat_template"] = wire["chat_template"]
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    (staging / "tokenizer.json").write_text(wire["tokenizer_json"], encoding="utf-8")
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    try:
        os.rename(staging, directory)
    except OSError:  # written meanwhile by a concurrent request
        shutil.rmtree(staging, ignore_errors=True)
    return directory
