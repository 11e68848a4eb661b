"""Bad requests to a training session, shared by tests/test_bad_input*.py.

`SESSION_CASES` are requests a training session receives and must reject, each with the `bios`
error class it raises, the field the error names and a hint its message gives; a case's call
takes (service, training session, path of a checkpoint of another base model). Around them:
the facts of bios/tiny, the small valid parts the requests are built from, and the checkpoint
store the tests look into.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from helpers import make_datum, random_batch

import bios
from bios import types
from bios.engine import CheckpointStore
from bios.errors import BiosError, InvalidRequestError, NotFoundError, UnsupportedError

VOCAB, MAX_SEQ, MAX_RANK = 4096, 256, 32  # facts of bios/tiny
GOOD = random_batch(7, size=3)
PROBE = random_batch(8, size=2)
ADAM = types.AdamParams(learning_rate=1e-2)
PROMPT = types.ModelInput.from_ints([5, 6, 7])
PARAMS = types.SamplingParams(max_tokens=3, seed=0)
NOWHERE = "bios://session-nobody/weights/nothing"


def datum(tokens: list[int], **inputs: object) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def ppo_datum(**drop: object) -> types.Datum:
    inputs = {"target_tokens": [2, 3, 4], "logprobs": [-1.0, -1.0, -1.0], "advantages": [1.0, -1.0, 0.5]}
    return datum([1, 2, 3], **{k: v for k, v in inputs.items() if k not in drop})


def store() -> CheckpointStore:
    return CheckpointStore(Path(os.environ["BIOS_HOME"]) / "checkpoints")


def raising_custom_loss(data: list, logprobs: list) -> tuple:
    return logprobs[0], {}  # not a scalar: rejected after the forward pass ran


Case = tuple[str, Callable[[bios.ServiceClient, bios.TrainingClient, str], object], type[BiosError], str, str]
"""(id, call(service, session, other model's checkpoint path), error class, field, hint in the message)."""
SESSION_CASES: list[Case] = [
    (
        "token id in model_input",
        lambda sv, t, o: t.forward_backward([datum([1, VOCAB], target_tokens=[2, 3])]),
        InvalidRequestError,
        "data[0].model_input",
        "0..4095",
    ),
    (
        "token id in target_tokens",
        lambda sv, t, o: t.forward_backward([datum([1, 2], target_tokens=[2, VOCAB + 5])]),
        InvalidRequestError,
        "data[0].loss_fn_inputs.target_tokens",
        "0..4095",
    ),
    (
        "huge token id",
        lambda sv, t, o: t.forward([datum([1, 2**70], target_tokens=[2, 3])]),
        InvalidRequestError,
        "data[0].model_input",
        "0..4095",
    ),
    (
        "token id in prompt",
        lambda sv, t, o: t.sample(types.ModelInput.from_ints([VOCAB]), PARAMS),
        InvalidRequestError,
        "prompt",
        "0..4095",
    ),
    (
        "stop token id",
        lambda sv, t, o: t.sample(PROMPT, types.SamplingParams(stop=[3, VOCAB])),
        InvalidRequestError,
        "sampling_params.stop",
        "0..4095",
    ),
    (
        "weights length",
        lambda sv, t, o: t.forward_backward([make_datum([1, 2, 3, 4], weights=[1.0, 1.0])]),
        InvalidRequestError,
        "data[0].loss_fn_inputs.weights",
        "one entry per input token (3)",
    ),
    (
        "target_tokens length",
        lambda sv, t, o: t.forward_backward([datum([1, 2, 3], target_tokens=[2, 3])]),
        InvalidRequestError,
        "data[0].loss_fn_inputs.target_tokens",
        "one entry per input token (3)",
    ),
    (
        "missing advantages",
        lambda sv, t, o: t.forward_backward([ppo_datum(advantages=1)], "ppo"),
        InvalidRequestError,
        "data[0].loss_fn_inputs.advantages",
        "needs target_tokens, logprobs, advantages",
    ),
    (
        "input the loss does not read",
        lambda sv, t, o: t.forward_backward([ppo_datum()], "cross_entropy"),
        InvalidRequestError,
        "data[0].loss_fn_inputs.",
        "it reads target_tokens, weights",
    ),
    (
        "unknown loss",
        lambda sv, t, o: t.forward_backward(GOOD, "mse"),
        InvalidRequestError,
        "loss_fn",
        "cross_entropy, importance_sampling, ppo, cispo, dro, gspo",
    ),
    (
        "gspo without its mask",
        lambda sv, t, o: t.forward_backward([ppo_datum()], "gspo"),
        InvalidRequestError,
        "data[0].loss_fn_inputs.sequence_ratio_mask",
        "needs target_tokens, logprobs, advantages, sequence_ratio_mask",
    ),
    (
        "stable_reinforce",
        lambda sv, t, o: t.forward_backward([ppo_datum()], "stable_reinforce"),
        UnsupportedError,
        "loss_fn",
        "objective",
    ),
    (
        "unknown config key",
        lambda sv, t, o: t.forward_backward([ppo_datum()], "ppo", {"clip_ratio": 0.2}),
        InvalidRequestError,
        "loss_fn_config.clip_ratio",
        "allowed: clip_low_threshold, clip_high_threshold",
    ),
    (
        "clip low above 1",
        lambda sv, t, o: t.forward_backward([ppo_datum()], "ppo", {"clip_low_threshold": 1.5}),
        InvalidRequestError,
        "loss_fn_config.clip_low_threshold",
        "0 <= clip_low_threshold <= 1 <= clip_high_threshold",
    ),
    (
        "clip high below 1",
        lambda sv, t, o: t.forward_backward([ppo_datum()], "cispo", {"clip_high_threshold": 0.5}),
        InvalidRequestError,
        "loss_fn_config",
        "0 <= clip_low_threshold <= 1 <= clip_high_threshold",
    ),
    (
        "config not a dict",
        lambda sv, t, o: t.forward_backward([ppo_datum()], "ppo", [0.8, 1.2]),
        InvalidRequestError,
        "loss_fn_config",
        "dict of setting -> number",
    ),
    (
        "train NaN learning rate",
        lambda sv, t, o: t.train(GOOD, learning_rate=math.nan),
        InvalidRequestError,
        "learning_rate",
        "finite number >= 0",
    ),
    (
        "train negative learning rate",
        lambda sv, t, o: t.train(GOOD, learning_rate=-1.0),
        InvalidRequestError,
        "learning_rate",
        "finite number >= 0",
    ),
    (
        "train unknown kwarg",
        lambda sv, t, o: t.train(GOOD, lr=1e-3),
        InvalidRequestError,
        "lr",
        "allowed: beta1, beta2, eps, grad_clip",
    ),
    (
        "optim_step with a dict",
        lambda sv, t, o: t.optim_step({"learning_rate": 1e-3}),
        InvalidRequestError,
        "adam_params",
        "AdamParams",
    ),
    (
        "num_samples 0",
        lambda sv, t, o: t.sample(PROMPT, PARAMS, num_samples=0),
        InvalidRequestError,
        "num_samples",
        "[1, 128]",
    ),
    ("empty data", lambda sv, t, o: t.forward_backward([]), InvalidRequestError, "data", "at least one Datum"),
    (
        "data not a list",
        lambda sv, t, o: t.forward_backward(iter(GOOD)),
        InvalidRequestError,
        "data",
        "list of bios.types.Datum",
    ),
    (
        "empty prompt",
        lambda sv, t, o: t.sample(types.ModelInput.empty(), PARAMS),
        InvalidRequestError,
        "prompt",
        "at least one token",
    ),
    (
        "sequence too long",
        lambda sv, t, o: t.forward_backward([make_datum(list(range(MAX_SEQ + 2)))]),
        InvalidRequestError,
        "data[0].model_input",
        "at most 256",
    ),
    (
        "prompt fills the context",
        lambda sv, t, o: t.sample(types.ModelInput.from_ints([1] * MAX_SEQ), PARAMS),
        InvalidRequestError,
        "prompt",
        "no room to generate within 256",
    ),
    ("unknown checkpoint, load_state", lambda sv, t, o: t.load_state(NOWHERE), NotFoundError, "path", NOWHERE),
    (
        "malformed path",
        lambda sv, t, o: t.load_state("weights/final"),
        InvalidRequestError,
        "path",
        "bios://SESSION/weights/NAME",
    ),
    (
        "name with a slash",
        lambda sv, t, o: t.save_state("runs/final"),
        InvalidRequestError,
        "name",
        "no path separators",
    ),
    ("name with ..", lambda sv, t, o: t.save_state(".."), InvalidRequestError, "name", "letters, digits"),
    (
        "name with a backslash",
        lambda sv, t, o: t.save_weights_for_sampler("a\\b"),
        InvalidRequestError,
        "name",
        "letters, digits",
    ),
    (
        "metadata not JSON",
        lambda sv, t, o: t.save_state("m1", metadata={"run": {"when": object()}}),
        InvalidRequestError,
        "metadata.run.when",
        "not JSON",
    ),
    (
        "metadata NaN",
        lambda sv, t, o: t.save_state("m2", metadata={"loss": math.nan}),
        InvalidRequestError,
        "metadata.loss",
        "not a finite number",
    ),
    (
        "checkpoint of another model",
        lambda sv, t, o: t.load_state(o),
        InvalidRequestError,
        "path",
        "ultrasafe/usf-general, but this session trains bios/tiny",
    ),
    (
        "custom loss not a scalar",
        lambda sv, t, o: t.forward_backward_custom(GOOD, raising_custom_loss),
        InvalidRequestError,
        "loss_fn",
        "scalar",
    ),
]
