"""Small builders of test data shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bios import types
from bios.backend import AdapterState
from bios.engine import CheckpointStore

MODEL = "bios/tiny"


def make_datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    """Next-token datum over `tokens` (input tokens[:-1], targets tokens[1:])."""
    inputs = {"target_tokens": tokens[1:]}
    if weights is not None:
        inputs["weights"] = weights
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def random_batch(seed: int, size: int = 4, length: int = 12, vocab: int = 4096) -> list[types.Datum]:
    """`size` random next-token data of `length` tokens each."""
    rng = np.random.default_rng(seed)
    return [make_datum(rng.integers(4, vocab, length).tolist()) for _ in range(size)]


def saved_state(path: str) -> AdapterState:
    """The adapter state (weights, Adam moments, step) stored at checkpoint `path`, exactly as
    the backend held it."""
    return CheckpointStore(Path(os.environ["BIOS_HOME"]) / "checkpoints").load(path, "inspected")


def saved_weights(path: str) -> dict[str, np.ndarray]:
    """The LoRA weights stored at checkpoint `path`, exactly as the backend held them."""
    return saved_state(path).weights
