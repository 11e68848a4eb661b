"""Bad input, end to end: every public entry point validates what it is given and raises a typed
`bios` error whose `field` names the culprit and whose message says what would be valid; and a
rejected request leaves its session exactly as it was — same step, same accumulated gradient,
same weights — without blocking the session's later requests or creating a checkpoint.

The central check (`test_a_rejected_request_changes_nothing`) runs one good forward_backward,
then a bad request, then optim_step, and compares everything observable with a twin session
(same seed) that never saw the bad request: step numbers, grad norm, a later forward's loss and
logprobs, and the saved safetensors (weights and Adam moments) — all bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import MODEL, make_datum, random_batch
from safetensors.numpy import load_file

import bios
from bios import types
from bios.engine import CheckpointStore
from bios.errors import BiosError, InvalidRequestError, NotFoundError
from bios.futures import BiosFuture

pytestmark = pytest.mark.api

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


def new_session(service: bios.ServiceClient, model: str = MODEL, rank: int = 8) -> bios.TrainingClient:
    return service.create_lora_training_client(base_model=model, rank=rank, seed=0)


def submit(call: Callable[[], object]) -> object:
    """Run a request to completion: a returned future is waited on, so a late failure raises too."""
    result = call()
    return result.result(timeout=120) if isinstance(result, BiosFuture) else result


def raising_custom_loss(data: list, logprobs: list) -> tuple:
    return logprobs[0], {}  # not a scalar: rejected after the forward pass ran


@pytest.fixture(scope="module")
def other_model_path(service: bios.ServiceClient) -> str:
    """A checkpoint of an adapter on another base model."""
    other = new_session(service, "ultrasafe/usf-general", rank=4)
    return other.save_state("other-model").result().path


# ---- each bad input: its error class, field and a hint at what is valid ---------------------

Case = tuple[str, Callable[[bios.ServiceClient, bios.TrainingClient, str], object], type[BiosError], str, str]
CASES: list[Case] = [
    (
        "unknown model, training",
        lambda sv, t, o: sv.create_lora_training_client(base_model="nope/x", rank=8),
        NotFoundError,
        "base_model",
        MODEL,
    ),
    (
        "unknown model, sampling",
        lambda sv, t, o: sv.create_sampling_client(base_model="nope/x"),
        NotFoundError,
        "base_model",
        MODEL,
    ),
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
        "token id in sampler prompt",
        lambda sv, t, o: sv.create_sampling_client(base_model=MODEL).sample(
            types.ModelInput.from_ints([1, 99999]), PARAMS
        ),
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
        "cross_entropy, importance_sampling, ppo, cispo, dro",
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
        "negative learning rate",
        lambda sv, t, o: types.AdamParams(learning_rate=-1e-4),
        InvalidRequestError,
        "learning_rate",
        "greater than or equal to 0",
    ),
    (
        "NaN learning rate",
        lambda sv, t, o: types.AdamParams(learning_rate=math.nan),
        InvalidRequestError,
        "learning_rate",
        "finite number",
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
        "max_tokens 0",
        lambda sv, t, o: types.SamplingParams(max_tokens=0),
        InvalidRequestError,
        "max_tokens",
        "greater than or equal to 1",
    ),
    ("top_p 0", lambda sv, t, o: types.SamplingParams(top_p=0.0), InvalidRequestError, "top_p", "greater than 0"),
    (
        "top_p above 1",
        lambda sv, t, o: types.SamplingParams(top_p=1.01),
        InvalidRequestError,
        "top_p",
        "less than or equal to 1",
    ),
    ("top_k 0", lambda sv, t, o: types.SamplingParams(top_k=0), InvalidRequestError, "top_k", "-1 (no limit) or >= 1"),
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
        "empty model_input",
        lambda sv, t, o: t.forward_backward([datum([], target_tokens=[])]),
        InvalidRequestError,
        "data[0].model_input",
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
        "unknown checkpoint, resume",
        lambda sv, t, o: sv.create_training_client_from_state(NOWHERE),
        NotFoundError,
        "path",
        NOWHERE,
    ),
    (
        "unknown checkpoint, sampler",
        lambda sv, t, o: sv.create_sampling_client(model_path=NOWHERE),
        NotFoundError,
        "path",
        NOWHERE,
    ),
    (
        "malformed path",
        lambda sv, t, o: t.load_state("weights/final"),
        InvalidRequestError,
        "path",
        "bios://SESSION/weights/NAME",
    ),
    (
        "path with ..",
        lambda sv, t, o: sv.create_sampling_client(model_path="bios://s/weights/../x"),
        InvalidRequestError,
        "path",
        "bios://SESSION/sampler_weights/NAME",
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
        "rank above the model's",
        lambda sv, t, o: sv.create_lora_training_client(base_model=MODEL, rank=MAX_RANK * 2),
        InvalidRequestError,
        "rank",
        "maximum LoRA rank 32",
    ),
    (
        "contradictory switches",
        lambda sv, t, o: sv.create_lora_training_client(
            base_model=MODEL, rank=8, target_modules=["q_proj"], train_attn=True
        ),
        InvalidRequestError,
        "train_attn",
        "contradicts target_modules",
    ),
    (
        "no module at all",
        lambda sv, t, o: sv.create_lora_training_client(base_model=MODEL, train_attn=False, train_mlp=False),
        InvalidRequestError,
        "target_modules",
        "at least one",
    ),
    (
        "lora_config and rank",
        lambda sv, t, o: sv.create_lora_training_client(base_model=MODEL, rank=8, lora_config=types.LoraConfig(rank=8)),
        InvalidRequestError,
        "lora_config",
        "not both",
    ),
    (
        "extra field, SamplingParams",
        lambda sv, t, o: types.SamplingParams(max_tokens=4, beam_width=2),
        InvalidRequestError,
        "SamplingParams.beam_width",
        "valid fields of SamplingParams are max_tokens, temperature",
    ),
    (
        "extra field, AdamParams",
        lambda sv, t, o: types.AdamParams(momentum=0.9),
        InvalidRequestError,
        "AdamParams.momentum",
        "valid fields of AdamParams are learning_rate, beta1",
    ),
    (
        "extra field, LoraConfig",
        lambda sv, t, o: types.LoraConfig(rank=8, bias="none"),
        InvalidRequestError,
        "LoraConfig.bias",
        "valid fields of LoraConfig are rank, alpha, target_modules",
    ),
    (
        "extra field, Datum",
        lambda sv, t, o: types.Datum(model_input=PROMPT, label=1),
        InvalidRequestError,
        "Datum.label",
        "valid fields of Datum are model_input, loss_fn_inputs",
    ),
    (
        "extra field, ModelInput",
        lambda sv, t, o: types.ModelInput(chunks=[], images=[]),
        InvalidRequestError,
        "ModelInput.images",
        "valid fields of ModelInput are chunks",
    ),
    (
        "extra field, TensorData",
        lambda sv, t, o: types.TensorData.model_validate({"data": [1], "dtype": "int64", "device": "cpu"}),
        InvalidRequestError,
        "TensorData.device",
        "valid fields of TensorData are data, dtype, shape",
    ),
    (
        "extra field, chunk",
        lambda sv, t, o: types.EncodedTextChunk(tokens=[1], text="a"),
        InvalidRequestError,
        "EncodedTextChunk.text",
        "valid fields of EncodedTextChunk are type, tokens",
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
        "metadata key",
        lambda sv, t, o: t.save_state("m3", metadata={1: "a"}),
        InvalidRequestError,
        "metadata",
        "non-string key",
    ),
    (
        "metadata not a dict",
        lambda sv, t, o: t.save_state("m4", metadata=["a"]),
        InvalidRequestError,
        "metadata",
        "must be a dict",
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


@pytest.mark.parametrize(("call", "error", "field", "hint"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_typed_error_naming_the_field(
    service, training, other_model_path, call, error, field, hint
) -> None:
    with pytest.raises(error) as info:
        submit(lambda: call(service, training, other_model_path))
    err = info.value
    assert type(err) is error
    assert err.field is not None and field in err.field, (err.field, err.message)
    assert hint in err.message, err.message
    assert err.to_dict()["field"] == err.field and err.status in (400, 404)


# ---- a rejected request changes nothing -----------------------------------------------------

BAD_REQUESTS = {
    case[0]: case[1]
    for case in CASES
    if case[0]
    in {
        "token id in model_input",
        "token id in target_tokens",
        "huge token id",
        "token id in prompt",
        "stop token id",
        "weights length",
        "target_tokens length",
        "missing advantages",
        "input the loss does not read",
        "unknown loss",
        "unknown config key",
        "clip low above 1",
        "clip high below 1",
        "config not a dict",
        "train NaN learning rate",
        "train negative learning rate",
        "train unknown kwarg",
        "optim_step with a dict",
        "num_samples 0",
        "empty data",
        "data not a list",
        "empty prompt",
        "sequence too long",
        "prompt fills the context",
        "unknown checkpoint, load_state",
        "malformed path",
        "name with a slash",
        "name with ..",
        "name with a backslash",
        "metadata not JSON",
        "metadata NaN",
        "checkpoint of another model",
        "custom loss not a scalar",
    }
}
BAD_REQUESTS |= {
    "train with valid data but a bad beta1": lambda sv, t, o: t.train(GOOD, learning_rate=1e-2, beta1=1.5),
    "train with bad data": lambda sv, t, o: t.train([datum([1, VOCAB], target_tokens=[2, 3])], learning_rate=1e-2),
    "train with a config for a custom loss": lambda sv, t, o: t.train(
        GOOD, raising_custom_loss, loss_fn_config={"beta": 1.0}
    ),
    "custom loss without target_tokens": lambda sv, t, o: t.forward_backward_custom(
        [datum([1, 2], weights=[1.0, 1.0])], raising_custom_loss
    ),
}


def observe(session: bios.TrainingClient, name: str) -> dict[str, object]:
    """Everything that shows a session's state after the optimizer step: step, grad norm, a
    forward's loss and logprobs, and the bytes-level contents of a saved checkpoint."""
    step = session.optim_step(ADAM).result(timeout=120)
    probe = session.forward(PROBE).result(timeout=120)
    record = session.save_state(name).result(timeout=120)
    tensors = load_file(
        str(
            Path(os.environ["BIOS_HOME"])
            / "checkpoints"
            / session.session_id
            / "weights"
            / name
            / "adapter.safetensors"
        )
    )
    return {
        "step": step.step,
        "grad_norm": step.metrics["grad_norm"],
        "info_step": session.get_info().step,
        "record_step": record.step,
        "probe_loss": probe.loss,
        "probe_logprobs": [out["logprobs"].data for out in probe.loss_fn_outputs],
        "tensors": tensors,
    }


@pytest.fixture(scope="module")
def twin(service: bios.ServiceClient) -> dict[str, object]:
    session = new_session(service)
    session.forward_backward(GOOD).result(timeout=120)
    return observe(session, "after-step")


@pytest.mark.parametrize("bad", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_a_rejected_request_changes_nothing(service, other_model_path, twin, bad) -> None:
    session = new_session(service)
    first = session.forward_backward(GOOD).result(timeout=120)  # a gradient is now accumulated
    info_before, checkpoints_before = session.get_info(), [r.path for r in store().list()]

    with pytest.raises(BiosError) as info:
        submit(lambda: bad(service, session, other_model_path))
    assert info.value.field  # every rejection names its field

    assert session.get_info() == info_before
    assert [r.path for r in store().list()] == checkpoints_before  # no checkpoint was created
    seen = observe(session, "after-step")
    assert first.loss > 0 and seen["grad_norm"] > 0
    tensors, twin_tensors = seen.pop("tensors"), twin["tensors"]
    assert seen == {k: v for k, v in twin.items() if k != "tensors"}
    assert seen["step"] == 1
    assert sorted(tensors) == sorted(twin_tensors)  # type: ignore[arg-type]
    assert any(k.startswith("adam_m/") for k in tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(value, twin_tensors[key], err_msg=key)  # type: ignore[index]


def test_the_twin_really_trained(service: bios.ServiceClient, twin: dict[str, object]) -> None:
    """Guards the comparison above: without the first forward_backward the result differs."""
    fresh = new_session(service)
    seen = observe(fresh, "no-gradient")
    assert seen["grad_norm"] == 0.0 and twin["grad_norm"] > 0  # type: ignore[operator]
    assert seen["probe_loss"] != twin["probe_loss"]


def test_requests_after_rejected_ones_still_run_in_order(training: bios.TrainingClient) -> None:
    """Rejected requests use up their place in the session's order without holding it: good
    requests submitted around them (without waiting) all complete, in submission order."""
    before = training.forward(PROBE)
    with pytest.raises(InvalidRequestError):
        training.forward_backward([])
    fb = training.forward_backward(GOOD)
    with pytest.raises(InvalidRequestError):
        training.sample(types.ModelInput.empty(), PARAMS)
    with pytest.raises(NotFoundError):
        training.load_state(NOWHERE)
    step = training.optim_step(ADAM)
    with pytest.raises(InvalidRequestError):
        training.save_state("../escape")
    after = training.forward(PROBE)
    sample = training.sample(PROMPT, PARAMS)
    assert fb.result(timeout=120).loss > 0
    assert step.result(timeout=120).step == 1
    assert after.result(timeout=120).loss < before.result(timeout=120).loss  # the step ran between them
    assert len(sample.result(timeout=120).sequences) == 1
    assert training.get_info().step == 1
    assert training.train(GOOD, learning_rate=1e-2).step == 2


def test_a_failing_train_skips_its_optimizer_step(training: bios.TrainingClient) -> None:
    with pytest.raises(InvalidRequestError) as info:
        training.train(GOOD, "ppo")  # cross-entropy data lacks the policy inputs
    assert info.value.field == "data[0].loss_fn_inputs.logprobs"
    assert training.get_info().step == 0
    assert training.optim_step(ADAM).result(timeout=120).metrics["grad_norm"] == 0.0


def test_unusual_but_valid_metadata_is_stored_as_json(training: bios.TrainingClient) -> None:
    """Tuples and numpy floats are JSON-able: accepted up front, never a late backend failure."""
    meta = {"shape": (2, 3), "nested": {"pair": ("a", None)}, "lr": np.float64(0.5), "ok": True}
    record = training.save_state("meta-tuples", metadata=meta).result(timeout=120)
    assert record.metadata == {"shape": [2, 3], "nested": {"pair": ["a", None]}, "lr": 0.5, "ok": True}
    assert store().record(record.path).metadata == record.metadata


def test_a_sampler_snapshot_cannot_resume_training(service, training):
    snapshot = training.save_weights_for_sampler("weights-only").result().path
    with pytest.raises(bios.InvalidRequestError) as err:
        service.create_training_client_from_state(snapshot)
    assert err.value.field == "path" and "save_state" in err.value.message
    with pytest.raises(bios.InvalidRequestError):
        training.load_state(snapshot)
    assert training.optim_step(types.AdamParams()).result().step == 1  # the session was untouched
