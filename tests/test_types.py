"""The public types (`bios.types`): array and token containers, sampling/optimizer/LoRA
parameters, frozen requests with typed, field-naming errors, tolerant results, and the
error classes' wire form."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bios import errors, types
from bios.errors import InvalidRequestError

# ---- TensorData ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint16, np.bool_])
def test_integer_arrays_become_int64(dtype: type) -> None:
    array = np.arange(6).reshape(2, 3).astype(dtype)
    tensor = types.TensorData.from_numpy(array)
    assert tensor.dtype == "int64" and tensor.shape == (2, 3)
    back = tensor.to_numpy()
    assert back.dtype == np.int64 and back.shape == (2, 3)
    np.testing.assert_array_equal(back, array.astype(np.int64))
    assert tensor.tolist() == array.astype(np.int64).tolist()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_arrays_become_float32(dtype: type) -> None:
    array = (np.linspace(-3, 3, 8) / 7).astype(dtype).reshape(2, 2, 2)
    back = types.TensorData.from_numpy(array).to_numpy()
    assert back.dtype == np.float32 and back.shape == (2, 2, 2)
    np.testing.assert_array_equal(back, array.astype(np.float32))


@given(
    hnp.arrays(
        np.int64, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), elements=st.integers(-(2**63), 2**63 - 1)
    )
)
def test_int64_round_trip_is_exact(array: np.ndarray) -> None:
    back = types.TensorData.from_numpy(array).to_numpy()
    assert back.shape == array.shape and back.dtype == np.int64
    np.testing.assert_array_equal(back, array)


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
    )
)
def test_float32_round_trip_is_exact(array: np.ndarray) -> None:
    tensor = types.TensorData.from_numpy(array)
    np.testing.assert_array_equal(tensor.to_numpy(), array)
    assert types.TensorData.model_validate_json(tensor.model_dump_json()) == tensor


def test_one_dimensional_without_shape() -> None:
    tensor = types.TensorData(data=[1, 2, 3], dtype="int64")
    assert tensor.shape is None and tensor.to_numpy().shape == (3,)


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"data": [1, 2, 3], "dtype": "int64", "shape": (2, 2)}, "TensorData.shape", "3 elements"),
        ({"data": [1, 2.5], "dtype": "int64"}, "TensorData.data.1", "whole numbers"),
        ({"data": [2**64], "dtype": "int64"}, "TensorData.data.0", "2**63"),
        ({"data": [1.0, float("nan")], "dtype": "float32"}, "TensorData.data", "finite"),
        ({"data": [1.0], "dtype": "float64"}, "TensorData.dtype", "'int64' or 'float32'"),
        ({"data": [1], "dtype": "int64", "device": "gpu"}, "TensorData.device", "Extra inputs"),
    ],
)
def test_invalid_tensor_data(kwargs: dict, field: str, hint: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        types.TensorData(**kwargs)
    assert info.value.field is not None and info.value.field.startswith(field)
    assert hint in info.value.message


@pytest.mark.parametrize("array", [np.array(["a", "b"]), np.array([1 + 2j]), np.array([object()])])
def test_from_numpy_rejects_other_dtypes(array: np.ndarray) -> None:
    with pytest.raises(InvalidRequestError) as info:
        types.TensorData.from_numpy(array)
    assert info.value.field == "TensorData.dtype" and "integers or floats" in info.value.message


# ---- ModelInput and Datum -----------------------------------------------------------------


def test_model_input_helpers() -> None:
    mi = types.ModelInput.from_ints(np.array([5, 6, 7], dtype=np.int32))
    assert mi.to_ints() == [5, 6, 7] and all(type(t) is int for t in mi.to_ints())
    assert mi.length == 3
    assert mi.append_int(np.int64(8)).to_ints() == [5, 6, 7, 8] and mi.length == 3
    empty = types.ModelInput.empty()
    assert empty.length == 0 and empty.to_ints() == [] and empty.chunks == []
    two = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[3])])
    assert two.to_ints() == [1, 2, 3] and two.length == 3
    assert (
        types.ModelInput.model_validate({"chunks": [{"tokens": [1, 2]}, {"type": "encoded_text", "tokens": [3]}]})
        == two
    )


def test_model_input_rejects_negative_and_unknown_chunks() -> None:
    with pytest.raises(InvalidRequestError) as info:
        types.ModelInput.from_ints([1, -2])
    assert info.value.field == "EncodedTextChunk.tokens" and ">= 0" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        types.ModelInput.model_validate({"chunks": [{"type": "image", "tokens": [1]}]})
    assert info.value.field == "ModelInput.chunks.0.type" and "encoded_text" in info.value.message


@pytest.mark.parametrize(
    ("tokens", "hint"),
    [
        ("hello", "tokenizer.encode(text)"),
        (b"hi", "tokenizer.encode(text)"),
        ([1, 2.5], "integer token ids"),
        ([1, "a"], "integer token ids"),
        (7, "integer token ids"),
        (np.array([1.0, 2.0]), "integer token ids"),
    ],
)
def test_from_ints_refuses_text_and_non_integers_naming_the_field(tokens: object, hint: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        types.ModelInput.from_ints(tokens)  # type: ignore[arg-type]
    assert info.value.field == "ModelInput.tokens" and hint in info.value.message


def test_datum_accepts_lists_numpy_and_tensor_data_alike() -> None:
    mi = types.ModelInput.from_ints([1, 2, 3])
    targets, weights = [2, 3, 4], [1.0, 0.5, 0.0]
    forms = [
        {"target_tokens": targets, "weights": weights},
        {"target_tokens": np.array(targets, dtype=np.int32), "weights": np.array(weights, dtype=np.float64)},
        {
            "target_tokens": types.TensorData(data=targets, dtype="int64"),
            "weights": types.TensorData.from_numpy(np.array(weights)),
        },
        {
            "target_tokens": {"data": targets, "dtype": "int64", "shape": [3]},
            "weights": {"data": weights, "dtype": "float32"},
        },
    ]
    data = [types.Datum(model_input=mi, loss_fn_inputs=form) for form in forms]
    for datum in data:
        np.testing.assert_array_equal(
            datum.loss_fn_inputs["target_tokens"].to_numpy(), np.array(targets, dtype=np.int64)
        )
        assert datum.loss_fn_inputs["target_tokens"].to_numpy().dtype == np.int64
        assert datum.loss_fn_inputs["weights"].to_numpy().dtype == np.float32
        np.testing.assert_array_equal(datum.loss_fn_inputs["weights"].to_numpy(), np.array(weights, dtype=np.float32))
    assert types.Datum.model_validate(data[1].model_dump()) == types.Datum.model_validate(data[0].model_dump())


@pytest.mark.parametrize("bad", [[[1, 2], [3]], ["a", "b"], "text", [1, None]])
def test_datum_rejects_what_is_not_an_array(bad: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        types.Datum(model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": bad})
    assert info.value.field == "Datum.loss_fn_inputs"


# ---- SamplingParams -----------------------------------------------------------------------


def test_sampling_defaults() -> None:
    p = types.SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (None, 1.0, 1.0, -1, None, None)
    assert p.stop_strings() == () and p.stop_token_ids() == ()


@pytest.mark.parametrize(
    ("stop", "strings", "ids"),
    [
        ("\n", ("\n",), ()),
        (["END", "\n\n"], ("END", "\n\n"), ()),
        ([7, 0, 4095], (), (7, 0, 4095)),
        ([], (), ()),
        (None, (), ()),
    ],
)
def test_stop_forms(stop: object, strings: tuple, ids: tuple) -> None:
    p = types.SamplingParams(stop=stop)
    assert p.stop_strings() == strings and p.stop_token_ids() == ids


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"max_tokens": 0}, "SamplingParams.max_tokens", "greater than or equal to 1"),
        ({"temperature": -0.1}, "SamplingParams.temperature", "greater than or equal to 0"),
        ({"temperature": float("inf")}, "SamplingParams.temperature", "finite"),
        ({"top_p": 0.0}, "SamplingParams.top_p", "greater than 0"),
        ({"top_p": 1.5}, "SamplingParams.top_p", "less than or equal to 1"),
        ({"top_k": 0}, "SamplingParams.top_k", "-1 (no limit) or >= 1"),
        ({"top_k": -5}, "SamplingParams.top_k", "-1 (no limit) or >= 1"),
        ({"seed": -1}, "SamplingParams.seed", "greater than or equal to 0"),
        ({"stop": ""}, "SamplingParams.stop", "non-empty"),
        ({"stop": ["ok", ""]}, "SamplingParams.stop", "non-empty"),
        ({"stop": [3, -1]}, "SamplingParams.stop", ">= 0"),
        ({"stop": [1, "a"]}, "SamplingParams.stop", "valid"),
        ({"max_token": 5}, "SamplingParams.max_token", "valid fields of SamplingParams are max_tokens,"),
    ],
)
def test_sampling_params_errors_name_the_field(kwargs: dict, field: str, hint: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        types.SamplingParams(**kwargs)
    assert info.value.field is not None and info.value.field.startswith(field)
    assert hint in info.value.message and info.value.message.startswith(info.value.field)


# ---- AdamParams ---------------------------------------------------------------------------


def test_adam_defaults_match_tinker() -> None:
    adam = types.AdamParams()
    assert (adam.learning_rate, adam.beta1, adam.beta2, adam.eps) == (1e-4, 0.9, 0.95, 1e-12)
    assert (adam.weight_decay, adam.grad_clip_norm) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.1}, "beta2"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"grad_clip_norm": float("inf")}, "grad_clip_norm"),
        ({"lr": 1.0}, "lr"),
    ],
)
def test_adam_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        types.AdamParams(**kwargs)
    assert info.value.field == f"AdamParams.{field}"


# ---- LoraConfig ---------------------------------------------------------------------------

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def test_lora_defaults() -> None:
    lora = types.LoraConfig(rank=8)
    assert lora.target_modules == ATTN + MLP
    assert (lora.train_attn, lora.train_mlp, lora.train_unembed) == (True, True, False)
    assert lora.alpha == 16.0 and lora.scale == 2.0
    assert types.LoraConfig().rank == 32 and types.LoraConfig().alpha == 64.0
    assert types.LoraConfig(rank=8, alpha=4).scale == 0.5


@pytest.mark.parametrize(
    ("kwargs", "modules", "switches"),
    [
        ({"train_mlp": False}, ATTN, (True, False, False)),
        ({"train_attn": False}, MLP, (False, True, False)),
        ({"train_unembed": True}, ATTN + MLP + ("lm_head",), (True, True, True)),
        (
            {"target_modules": ["lm_head", "v_proj", "q_proj", "q_proj"]},
            ("q_proj", "v_proj", "lm_head"),
            (False, False, True),
        ),
        ({"target_modules": list(MLP), "train_mlp": True, "train_attn": False}, MLP, (False, True, False)),
    ],
)
def test_lora_resolution(kwargs: dict, modules: tuple, switches: tuple) -> None:
    lora = types.LoraConfig(rank=4, **kwargs)
    assert lora.target_modules == modules
    assert (lora.train_attn, lora.train_mlp, lora.train_unembed) == switches
    again = types.LoraConfig.model_validate(lora.model_dump())
    assert again == lora
    assert types.LoraConfig.model_validate_json(lora.model_dump_json()) == lora


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"target_modules": ["q_proj"], "train_attn": True}, "LoraConfig.train_attn", "contradicts target_modules"),
        ({"target_modules": ["q_proj"], "train_mlp": True}, "LoraConfig.train_mlp", "contradicts target_modules"),
        ({"target_modules": ["lm_head"], "train_unembed": False}, "LoraConfig.train_unembed", "contradicts"),
        ({"train_attn": False, "train_mlp": False}, "LoraConfig.target_modules", "at least one"),
        ({"target_modules": []}, "LoraConfig.target_modules", "at least one"),
        ({"target_modules": ["embed_tokens"]}, "LoraConfig.target_modules.0", "'q_proj'"),
        ({"rank": 0}, "LoraConfig.rank", "greater than or equal to 1"),
        ({"rank": 1024}, "LoraConfig.rank", "less than or equal to 512"),
        ({"rank": None}, "LoraConfig.rank", "valid integer"),
        ({"alpha": 0}, "LoraConfig.alpha", "greater than 0"),
        ({"dropout": 1.0}, "LoraConfig.dropout", "less than 1"),
        ({"rnak": 8}, "LoraConfig.rnak", "Extra inputs"),
    ],
)
def test_lora_errors_name_the_field(kwargs: dict, field: str, hint: str) -> None:
    for build in (lambda: types.LoraConfig(**kwargs), lambda: types.LoraConfig.model_validate(kwargs)):
        with pytest.raises(InvalidRequestError) as info:
            build()
        assert info.value.field == field
        assert hint in info.value.message


# ---- request and result behaviour ---------------------------------------------------------


def test_requests_are_frozen_and_model_copy_validates() -> None:
    params = types.SamplingParams(top_p=0.9)
    with pytest.raises(InvalidRequestError) as info:
        params.top_p = 0.5  # type: ignore[misc]
    assert info.value.field == "SamplingParams.top_p" and "model_copy" in info.value.message
    assert params.top_p == 0.9
    assert params.model_copy(update={"top_k": 5}) == types.SamplingParams(top_p=0.9, top_k=5)
    with pytest.raises(InvalidRequestError) as info:
        params.model_copy(update={"top_p": 5.0})
    assert info.value.field == "SamplingParams.top_p"
    with pytest.raises(InvalidRequestError) as info:
        types.AdamParams().model_copy(update={"learning_rate": -1.0})
    assert info.value.field == "AdamParams.learning_rate"
    datum = types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [2]})
    with pytest.raises(InvalidRequestError):
        datum.model_input = types.ModelInput.empty()  # type: ignore[misc]


def test_nested_errors_keep_the_full_field_path() -> None:
    with pytest.raises(InvalidRequestError) as info:
        types.Datum.model_validate({"model_input": {"chunks": [{"tokens": [1, -1]}]}})
    assert info.value.field == "Datum.model_input.chunks.0.tokens"
    with pytest.raises(InvalidRequestError) as info:
        types.Datum(model_input={"chunks": [{"tokens": [3], "colour": 1}]})
    assert info.value.field == "Datum.model_input.chunks.0.colour"
    with pytest.raises(InvalidRequestError) as info:
        types.SamplingParams.model_validate_json('{"top_p": 2}')
    assert info.value.field == "SamplingParams.top_p"


def test_every_pydantic_failure_is_an_invalid_request_error() -> None:
    cases = [
        lambda: types.TensorData(data="abc", dtype="int64"),
        lambda: types.EncodedTextChunk(tokens=["x"]),
        lambda: types.ModelInput(chunks=5),
        lambda: types.Datum(model_input=None),
        lambda: types.SamplingParams(max_tokens="many"),
        lambda: types.AdamParams(beta1="high"),
        lambda: types.LoraConfig(seed=-1),
        lambda: types.LoraConfig.model_validate_json("not json"),
    ]
    for case in cases:
        with pytest.raises(InvalidRequestError) as info:
            case()
        assert isinstance(info.value, ValueError)
        assert info.value.field and info.value.message.startswith(info.value.field.split(".")[0])
        assert info.value.status == 400 and info.value.code == "invalid_request"


def test_results_ignore_unknown_fields_and_are_frozen() -> None:
    step = types.OptimStepResult.model_validate({"step": 3, "metrics": {"grad_norm": 1.5}, "added_later": [1]})
    assert step == types.OptimStepResult(step=3, metrics={"grad_norm": 1.5})
    seq = types.SampledSequence(tokens=[1], logprobs=[-0.5], stop_reason="length", entropy=2.0)
    assert seq.model_dump() == {"tokens": [1], "logprobs": [-0.5], "stop_reason": "length", "sequence_id": None}
    info = types.TrainingInfo.model_validate(
        {"session_id": "s", "base_model": "m", "step": 0, "lora_config": {"rank": 4}, "x": 1}
    )
    assert info.lora_config == types.LoraConfig(rank=4)
    with pytest.raises(pydantic.ValidationError):
        step.step = 4  # type: ignore[misc]
    assert step.step == 3
    assert types.ModelOutput is types.ForwardBackwardResult and types.SampleResponse is types.SampleResult


def test_errors_round_trip_through_their_wire_form() -> None:
    for cls in (
        errors.InvalidRequestError,
        errors.NotFoundError,
        errors.ConflictError,
        errors.BackendError,
        errors.UnsupportedError,
        errors.APITimeoutError,
        errors.BlockingCallError,
    ):
        err = cls("something: went wrong", field="something")
        again = errors.BiosError.from_dict(err.to_dict())
        assert type(again) is cls and again.message == err.message and again.field == "something"
        assert again.to_dict() == err.to_dict()
    assert type(errors.BiosError.from_dict({"code": "from_the_future", "message": "m"})) is errors.BiosError
    assert issubclass(errors.UnsupportedError, errors.InvalidRequestError)
    assert issubclass(errors.NotFoundError, LookupError) and errors.NotFoundError.status == 404
