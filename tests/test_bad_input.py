"""Bad input, end to end: every public entry point validates what it is given and raises a typed
`bios` error whose `field` names the culprit and whose message says what would be valid; and a
rejected request leaves its session exactly as it was — same step, same accumulated gradient,
same weights — without creating a checkpoint.

The central check (`test_a_rejected_request_changes_nothing`) runs one good forward_backward,
then a bad request, then optim_step, and compares everything observable with a twin session
(same seed) that never saw the bad request: step numbers, grad norm, a later forward's loss and
logprobs, and the saved safetensors (weights and Adam moments) — all bit for bit. The requests a
session receives are catalogued in tests/support/bad_requests.py; what a session does after
rejecting one is tested in test_bad_input_sessions.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bad_requests import (
    ADAM,
    GOOD,
    MAX_RANK,
    NOWHERE,
    PARAMS,
    PROBE,
    PROMPT,
    SESSION_CASES,
    VOCAB,
    Case,
    datum,
    raising_custom_loss,
    store,
)
from helpers import MODEL
from safetensors.numpy import load_file

import bios
from bios import types
from bios.errors import BiosError, InvalidRequestError, NotFoundError
from bios.futures import BiosFuture

pytestmark = pytest.mark.api


def new_session(service: bios.ServiceClient, model: str = MODEL, rank: int = 8) -> bios.TrainingClient:
    return service.create_lora_training_client(base_model=model, rank=rank, seed=0)


def submit(call: Callable[[], object]) -> object:
    """Run a request to completion: a returned future is waited on, so a late failure raises too."""
    result = call()
    return result.result(timeout=120) if isinstance(result, BiosFuture) else result


@pytest.fixture(scope="module")
def other_model_path(service: bios.ServiceClient) -> str:
    """A checkpoint of an adapter on another base model."""
    other = new_session(service, "ultrasafe/usf-general", rank=4)
    return other.save_state("other-model").result().path


# ---- each bad input: its error class, field and a hint at what is valid ---------------------

OTHER_CASES: list[Case] = [
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
        "token id in sampler prompt",
        lambda sv, t, o: sv.create_sampling_client(base_model=MODEL).sample(
            types.ModelInput.from_ints([1, 99999]), PARAMS
        ),
        InvalidRequestError,
        "prompt",
        "0..4095",
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
        "empty model_input",
        lambda sv, t, o: t.forward_backward([datum([], target_tokens=[])]),
        InvalidRequestError,
        "data[0].model_input",
        "at least one token",
    ),
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
        "path with ..",
        lambda sv, t, o: sv.create_sampling_client(model_path="bios://s/weights/../x"),
        InvalidRequestError,
        "path",
        "bios://SESSION/sampler_weights/NAME",
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
]
"""Bad inputs checked for their error only: most never reach a session (a type or a client is
being built)."""
CASES = SESSION_CASES + OTHER_CASES


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

BAD_REQUESTS = {case[0]: case[1] for case in SESSION_CASES}
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
