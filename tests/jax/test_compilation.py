"""A training loop with varying batch sizes and lengths compiles a handful of programs."""

from __future__ import annotations

import numpy as np

import bios
from backends.jax import compiled
from bios import types
from helpers import make_datum


def test_a_varied_training_loop_compiles_few_programs():
    client = bios.ServiceClient(backend="jax").create_lora_training_client("ultrasafe/usf-code", rank=8, seed=1)
    rng = np.random.default_rng(0)
    before = compiled.compile_counts()
    for _ in range(24):
        batch = [make_datum(rng.integers(4, 4096, rng.integers(3, 60)).tolist()) for _ in range(rng.integers(1, 9))]
        client.forward_backward(batch)
        client.optim_step(types.AdamParams(learning_rate=float(rng.uniform(1e-4, 1e-2)), weight_decay=float(rng.uniform(0, 0.1))))
    client.optim_step(types.AdamParams()).result()
    grown = {name: count - before[name] for name, count in compiled.compile_counts().items()}
    # rows bucket to {4, 8} and tokens to {16, 32, 64}: at most 6 shapes; hyperparameters never recompile
    assert 1 <= grown["forward_backward"] <= 6, grown
    assert grown["optim_step"] <= 1, grown
