"""A training loop with varying batch sizes and lengths compiles a handful of programs."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_datum

import bios
from backends.jax import compiled
from bios import types, validation


@pytest.mark.slow
def test_a_varied_training_loop_compiles_few_programs():
    client = bios.ServiceClient(backend="jax").create_lora_training_client("ultrasafe/usf-code", rank=8, seed=1)
    rng = np.random.default_rng(0)
    before = compiled.compile_counts()
    for _ in range(24):
        batch = [make_datum(rng.integers(4, 4096, rng.integers(3, 60)).tolist()) for _ in range(rng.integers(1, 9))]
        client.forward_backward(batch)
        client.optim_step(
            types.AdamParams(learning_rate=float(rng.uniform(1e-4, 1e-2)), weight_decay=float(rng.uniform(0, 0.1)))
        )
    client.optim_step(types.AdamParams()).result()
    grown = {name: count - before[name] for name, count in compiled.compile_counts().items()}
    # 1-8 data of 2-59 tokens: batch rows as long as the longest datum (16, 32 or 64 tokens, 1-8
    # of them), or all data packed into one row as long as their total (16-512 tokens by quarter
    # octaves above 128); hyperparameters never recompile. A forward_backward that finds its
    # optim_step queued runs fused (train_update), the rest alone: each holds at most those shapes
    assert grown["forward_backward"] + grown["train_update"] >= 1, grown
    assert grown["forward_backward"] <= 10 and grown["train_update"] <= 10, grown
    assert grown["adam_update"] <= 1 and grown["write_back"] <= 1, grown


@pytest.mark.slow
def test_a_batch_over_the_token_budget_runs_in_micro_batches_with_the_same_result():
    budgeted = bios.ServiceClient(backend="jax", backend_options={"tokens_per_call": "128"})
    small = budgeted.create_lora_training_client("bios/tiny", rank=4, seed=5)
    large = bios.ServiceClient(backend="jax").create_lora_training_client("bios/tiny", rank=4, seed=5)
    rng = np.random.default_rng(1)
    batch = [make_datum(rng.integers(4, 4096, 30).tolist()) for _ in range(10)]
    backend = budgeted.transport.backend
    results = [client.forward_backward(batch).result() for client in (small, large)]
    steps = [client.optim_step(types.AdamParams(learning_rate=1e-2)).result() for client in (small, large)]
    assert backend.describe("bios/tiny").tokens_per_call == 128
    assert np.isclose(results[0].loss, results[1].loss, rtol=1e-6)
    assert np.isclose(steps[0].metrics["grad_norm"], steps[1].metrics["grad_norm"], rtol=1e-5)


def test_each_request_is_reported_once_its_micro_batches_ran():
    service = bios.ServiceClient(backend="jax", backend_options={"tokens_per_call": "64"})
    first, second = (service.create_lora_training_client("bios/tiny", rank=4, seed=s) for s in (1, 2))
    spec = service.transport.catalog.get("bios/tiny")
    rng = np.random.default_rng(2)
    items = [  # submitted out of slot order; 64 tokens per call = 2 rows of 32 per micro-batch
        validation.forward_work(
            client.session_id,
            spec,
            [make_datum(rng.integers(4, 4096, 20).tolist()) for _ in range(3)],
            "cross_entropy",
            None,
            backward=False,
        )
        for client in (second, first)
    ]
    reports: list[int] = []
    results = service.transport.backend.forward_backward(items, lambda index, output: reports.append(index))
    assert reports == [1, 0]  # `first` has the lower slot, so its rows run (and it is reported) first
    assert all(isinstance(r.loss, float) for r in results)


def test_every_jitted_function_is_in_compiled_and_counted():
    """`jax.jit` appears in compiled.py only, and compile_counts() covers all it builds."""
    package = Path(compiled.__file__).parent
    for path in package.glob("*.py"):
        calls_jit = any(
            isinstance(node, ast.Attribute) and node.attr == "jit" for node in ast.walk(ast.parse(path.read_text()))
        )
        assert calls_jit == (path.name == "compiled.py"), path.name
    jitted = {name for name, value in vars(compiled).items() if isinstance(value, type(compiled.forward))}
    assert jitted == set(compiled.compile_counts())


def test_the_compilation_cache_option_fills_its_directory(tmp_path):
    """With `compilation_cache_dir`, even quickly compiled programs are stored there (the
    backend reads no environment variable, so none is set here)."""
    cache = tmp_path / "cache"
    script = (
        "import bios\n"
        f"options = {{'compilation_cache_dir': {str(cache)!r}}}\n"
        "client = bios.ServiceClient(backend='jax', backend_options=options)\n"
        "training = client.create_lora_training_client('bios/tiny', rank=4, seed=1)\n"
        "training.forward([bios.types.Datum(model_input=bios.types.ModelInput.from_ints([1, 2, 3]),"
        " loss_fn_inputs={'target_tokens': [2, 3, 4]})]).result()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")} | {"BIOS_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert cache.is_dir() and any(cache.iterdir())
