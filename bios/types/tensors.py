"""Arrays and token sequences as they cross the API: `TensorData`, `ModelInput`, `Datum`."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from bios.errors import InvalidRequestError, UnsupportedError
from bios.types._base import RequestModel, field_error

TensorDtype = Literal["int64", "float32"]
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class TensorData(RequestModel):
    """A dense array on the wire: flat `data` in row-major order, its `dtype` and `shape`."""

    data: list[int] | list[float]
    """The elements, flattened in C order."""
    dtype: TensorDtype
    """`int64` for token ids, `float32` for everything else."""
    shape: tuple[int, ...] | None = None
    """Dimensions; None means one-dimensional of length `len(data)`."""

    @model_validator(mode="after")
    def _shape_matches(self) -> TensorData:
        if self.shape is not None and int(np.prod(self.shape, dtype=np.int64)) != len(self.data):
            raise field_error(
                ("shape",), f"shape {self.shape} does not hold the {len(self.data)} elements of data", self.shape
            )
        if self.dtype == "int64":
            for i, x in enumerate(self.data):
                if x != int(x) or not _INT64_MIN <= int(x) <= _INT64_MAX:
                    raise field_error(("data", i), "int64 data must hold whole numbers in [-2**63, 2**63)", x)
        return self

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        """Wrap an integer array as int64 or a floating array as float32 (NaN/inf rejected)."""
        array = np.asarray(array)
        if array.dtype.kind in "iub":
            return cls(data=array.astype(np.int64).ravel().tolist(), dtype="int64", shape=array.shape)
        if array.dtype.kind == "f":
            return cls(data=array.astype(np.float32).ravel().tolist(), dtype="float32", shape=array.shape)
        raise InvalidRequestError(
            f"TensorData: arrays of integers or floats are accepted, got dtype {array.dtype}",
            field="TensorData.dtype",
        )

    def to_numpy(self) -> np.ndarray:
        """The array, with its dtype and shape restored."""
        array = np.asarray(self.data, dtype=np.int64 if self.dtype == "int64" else np.float32)
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self) -> Any:
        """The array as a `torch.Tensor` (int64 or float32), as the tinker SDK's custom losses
        read their inputs. UnsupportedError when torch is not installed."""
        try:
            import torch
        except ImportError:
            raise UnsupportedError("TensorData.to_torch needs torch: pip install torch", field="torch") from None
        return torch.from_numpy(self.to_numpy())

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        """Wrap a `torch.Tensor` as `from_numpy` wraps an array (detached, on the CPU)."""
        return cls.from_numpy(tensor.detach().cpu().numpy())

    def tolist(self) -> list[Any]:
        """Nested Python lists of the values."""
        values: list[Any] = self.to_numpy().tolist()
        return values


class EncodedTextChunk(RequestModel):
    """A run of token ids. (Other chunk types, such as images, may join it later.)"""

    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _non_negative(cls, tokens: list[int]) -> list[int]:
        if any(t < 0 for t in tokens):
            raise ValueError("token ids must be >= 0")
        return tokens


class ModelInput(RequestModel):
    """The tokens a model reads, as a list of chunks."""

    chunks: list[EncodedTextChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Sequence[int] | np.ndarray) -> ModelInput:
        """One text chunk holding `tokens` (ints, numpy integers included). InvalidRequestError
        naming `ModelInput.tokens` for text or any id that is not an integer."""
        if isinstance(tokens, str | bytes):
            raise InvalidRequestError(
                f"ModelInput.tokens: expected token ids, got the text {tokens[:40]!r}; "
                "encode it first: ModelInput.from_ints(tokenizer.encode(text))",
                field="ModelInput.tokens",
            )
        try:
            ids = [operator.index(t) for t in tokens]
        except TypeError:
            raise InvalidRequestError(
                f"ModelInput.tokens: expected a sequence of integer token ids, got {repr(tokens)[:80]}",
                field="ModelInput.tokens",
            ) from None
        return cls(chunks=[EncodedTextChunk(tokens=ids)])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        """All token ids, chunks concatenated."""
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        """Number of tokens."""
        return sum(len(chunk.tokens) for chunk in self.chunks)

    def append_int(self, token: int) -> ModelInput:
        """A new ModelInput with `token` appended."""
        return ModelInput.from_ints([*self.to_ints(), int(token)])


def _as_tensor(value: object) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if isinstance(value, dict):
        return TensorData.model_validate(value)
    array = np.asarray(value)
    if array.dtype == object:
        raise ValueError("expected a flat list of numbers")
    return TensorData.from_numpy(array)


class Datum(RequestModel):
    """One training example: the input tokens and the per-token inputs of the loss.

    Every array in `loss_fn_inputs` is aligned with `model_input`: position i of the input
    predicts `target_tokens[i]`. Lists, numpy arrays and `TensorData` are all accepted.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert_arrays(cls, value: object) -> dict[str, TensorData]:
        if not isinstance(value, dict):
            raise ValueError("loss_fn_inputs must be a dict of name -> array")
        return {str(k): _as_tensor(v) for k, v in value.items()}
