"""SmolLM2-135M-Instruct (real weights, 30 layers) trained in bfloat16 on the JAX backend,
held to the float64 emulator within the bounds conformance/tolerances.py derives for its depth.

The inputs are chat-formatted English, as the model is used: on uniformly random token ids a
real model meets inputs that are ill-conditioned in any low precision (one random sequence moves
a logprob by ~3 nats in `transformers`' own bfloat16 too), which no rounding bound covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bf16_pair import compare_training, random_targets

import bios
from bios.catalog import spec_from_hf_directory
from bios.model_fetch import SMOLLM2_DIRECTORY, SMOLLM2_NAME
from bios.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in two sentences.",
    "Which is larger, 17 or 71, and why?",
    "Name three uses of a paperclip.",
    "How do I boil an egg?",
]


def test_smollm2_in_bfloat16_stays_within_the_derived_bounds(smollm2_home: Path) -> None:
    directory = smollm2_home / "models" / SMOLLM2_DIRECTORY
    spec, tokenizer = spec_from_hf_directory(SMOLLM2_NAME, directory), Tokenizer.from_directory(directory)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS
    ]
    emulator, candidate = (
        bios.ServiceClient(backend="emulator"),
        bios.ServiceClient(backend="jax", backend_options={"dtype": "bfloat16"}),
    )
    errors = compare_training(
        emulator,
        candidate,
        SMOLLM2_NAME,
        spec.n_layers,
        lambda step: random_targets(step, spec.vocab_size, [prompts[step % 6], prompts[(step + 1) % 6]]),
    )
    print(f"{SMOLLM2_NAME}: measured/bound {errors.report()}")
    errors.assert_within()
    assert errors.state_dtypes == {np.dtype(np.float32)}
