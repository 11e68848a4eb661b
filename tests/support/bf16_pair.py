"""Training the same adapter on the float64 emulator and on the JAX backend in bfloat16, and
holding the bfloat16 side to the derived tolerances of conformance/tolerances.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from helpers import make_datum

import bios
from bios import types
from bios.backend import AdapterState
from bios.engine import CheckpointStore
from conformance import tolerances

STEPS = 5
LEARNING_RATE = 1e-4
"""Small enough that a bfloat16 LoRA factor would round its updates away (|A| > 2⁹·lr)."""


@dataclass
class Errors:
    """Worst measured error and its bound, by quantity (for the assertion message and reports)."""

    measured: dict[str, float] = field(default_factory=dict)
    bound: dict[str, float] = field(default_factory=dict)
    state_dtypes: set[np.dtype] = field(default_factory=set)
    """The dtypes of the candidate's saved LoRA weights and Adam moments."""

    def check(self, name: str, measured: float, bound: float) -> None:
        self.measured[name] = max(measured, self.measured.get(name, 0.0))
        self.bound[name] = bound

    def report(self) -> str:
        return ", ".join(f"{k} {self.measured[k]:.3g}/{self.bound[k]:.3g}" for k in self.measured)

    def assert_within(self) -> None:
        failed = [k for k in self.measured if not self.measured[k] <= self.bound[k]]
        assert not failed, f"bfloat16 past its bound ({failed}): measured/bound {self.report()}"


def random_data(seed: int, vocab: int, lengths: tuple[int, ...]) -> list[types.Datum]:
    """Next-token data with uniformly drawn tokens and loss weights in [0, 1)."""
    rng = np.random.default_rng(seed)
    return [make_datum(rng.integers(4, vocab, n).tolist(), rng.random(n - 1).tolist()) for n in lengths]


def random_targets(seed: int, vocab: int, prompts: list[list[int]]) -> list[types.Datum]:
    """Data whose inputs are `prompts` (e.g. real text, which a real model is conditioned on) and
    whose targets are drawn uniformly, with loss weights in [0, 1)."""
    rng = np.random.default_rng(seed)
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(prompt),
            loss_fn_inputs={
                "target_tokens": rng.integers(0, vocab, len(prompt)).tolist(),
                "weights": rng.random(len(prompt)).tolist(),
            },
        )
        for prompt in prompts
    ]


def _logprobs(result: types.ForwardBackwardOutput) -> np.ndarray:
    return np.concatenate([np.asarray(o["logprobs"].data, np.float64) for o in result.loss_fn_outputs])


def _weight_norm(data: list[types.Datum]) -> float:
    return float(np.linalg.norm(np.concatenate([np.asarray(d.loss_fn_inputs["weights"].data) for d in data])))


def _state(client: bios.TrainingClient, name: str) -> AdapterState:
    store = CheckpointStore(Path(os.environ["BIOS_HOME"]) / "checkpoints")
    return store.load(client.save_state(name).result().path, name)


def _relative(got: dict, expected: dict, origin: dict | None, keys: list[str]) -> float:
    """‖got - expected‖ / ‖expected - origin‖ over the arrays `keys` taken together."""
    error = sum(float(np.sum((got[k] - expected[k]) ** 2)) for k in keys)
    size = sum(float(np.sum((expected[k] - (origin[k] if origin else 0)) ** 2)) for k in keys)
    return (error / size) ** 0.5


def compare_training(
    emulator: bios.ServiceClient,
    candidate: bios.ServiceClient,
    model: str,
    n_layers: int,
    data_of_step: Callable[[int], list[types.Datum]],
) -> Errors:
    """STEPS rounds of forward_backward + optim_step of one adapter (rank 8, lm_head included)
    on both services, on `data_of_step(step)` (uniformly drawn targets, so that the spread of
    their reference logprobs estimates the logits' σ_z), then a forward on `data_of_step(STEPS)`;
    returns every error next to its bound. Logprobs and losses are compared at every step, the
    LoRA update and Adam moments after the last."""
    config = dict(rank=8, seed=3, train_unembed=True)
    reference, bf16 = (s.create_lora_training_client(model, **config) for s in (emulator, candidate))
    origin = _state(reference, "origin").weights
    errors = Errors()
    adam = types.AdamParams(learning_rate=LEARNING_RATE)
    for step in range(STEPS + 1):
        data = data_of_step(step)
        if step < STEPS:
            expected, got = (c.forward_backward(data, "cross_entropy").result() for c in (reference, bf16))
        else:
            expected, got = (c.forward(data, "cross_entropy").result() for c in (reference, bf16))
        lp = _logprobs(expected)
        spread = float(lp.std())  # σ_z: the logprobs of uniform targets spread like the logits
        errors.check(
            "logprob", float(np.abs(_logprobs(got) - lp).max()), tolerances.bf16_logprob_atol(n_layers, spread)
        )
        errors.check(
            "loss", abs(got.loss - expected.loss), tolerances.bf16_loss_atol(n_layers, spread, _weight_norm(data))
        )
        if step < STEPS:
            for client in (reference, bf16):
                client.optim_step(adam).result()
    expected_state, got_state = _state(reference, "trained"), _state(bf16, "trained-bf16")
    for factor in ("lora_A", "lora_B"):
        keys = [k for k in expected_state.weights if k.endswith(factor)]
        errors.check(
            f"update {factor}",
            _relative(got_state.weights, expected_state.weights, origin, keys),
            tolerances.bf16_update_rtol(n_layers),
        )
    for moment in ("adam_m", "adam_v"):
        got_m, expected_m = getattr(got_state, moment), getattr(expected_state, moment)
        errors.check(
            moment, _relative(got_m, expected_m, None, list(expected_m)), tolerances.bf16_moment_rtol(n_layers)
        )
    for group in (got_state.weights, got_state.adam_m, got_state.adam_v):
        errors.state_dtypes |= {v.dtype for v in group.values()}
    return errors
