"""Tinker's binary encodings to and from Bios types.

Requests: a `ForwardBackwardRequest` (tokens as int32 bytes, loss inputs as typed dense or
CSR-sparse tensors) becomes Bios `Datum`s and a loss config. Results: a Bios
`ForwardBackwardResult` becomes a `ForwardBackwardOutput` (per-datum outputs packed into one
`ArrayRecord` of `BatchedTensor`s), a `SampleResult` a `SampleResponse`. Numbers inside
`bytes` fields are little-endian numpy buffers, as the SDK writes and reads them.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError, Message

from bios.errors import InvalidRequestError, UnsupportedError
from bios.server.tinker import proto
from bios.types import Datum, ForwardBackwardResult, ModelInput, SampleResult, TensorData

MASK_LOGPROB = -99999.0
"""The logprob of a top-k entry that holds no token (the SDK reads a row of them as None)."""

_NUMPY: dict[int, np.dtype] = {proto.DTYPE_FLOAT32: np.dtype("<f4"), proto.DTYPE_INT64: np.dtype("<i8")}
_INT64 = np.dtype("<i8")


def parse_forward_backward(body: bytes) -> Message:
    """The `ForwardBackwardRequest` in `body`; InvalidRequestError if it is not one."""
    try:
        return proto.ForwardBackwardRequest.FromString(body)
    except DecodeError as exc:
        raise InvalidRequestError(f"body: not a protobuf ForwardBackwardRequest ({exc})", field="body") from None


def tensor_array(tensor: Message, where: str) -> np.ndarray:
    """The array a `Tensor` encodes: dense, or CSR-sparse with absent entries 0. An empty shape
    means one dimension."""
    dtype = _NUMPY.get(tensor.dtype)
    if dtype is None:
        raise InvalidRequestError(
            f"{where}: dtype must be DTYPE_FLOAT32 or DTYPE_INT64, got {tensor.dtype}", field=where
        )
    shape = tuple(tensor.shape)
    try:
        if tensor.WhichOneof("encoding") == "sparse_csr":
            return _csr_to_dense(tensor.sparse_csr, dtype, shape)
        flat = np.frombuffer(tensor.dense, dtype)
        return flat.reshape(shape) if shape else flat
    except ValueError as exc:
        raise InvalidRequestError(f"{where}: malformed tensor ({exc})", field=where) from None


def _csr_to_dense(csr: Message, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) != 2:
        raise ValueError(f"a sparse tensor needs a 2-D shape, got {list(shape)}")
    values = np.frombuffer(csr.values, dtype)
    rows_start, columns = np.frombuffer(csr.crow_indices, _INT64), np.frombuffer(csr.col_indices, _INT64)
    counts = np.diff(rows_start)
    if (
        rows_start.size != shape[0] + 1
        or np.any(counts < 0)
        or counts.sum() != values.size
        or columns.size != values.size
    ):
        raise ValueError("crow_indices, col_indices and values disagree")
    if np.any(columns < 0) or np.any(columns >= shape[1]):
        raise ValueError("a column index is out of range")
    dense = np.zeros(shape, dtype)
    dense[np.repeat(np.arange(shape[0]), counts), columns] = values
    return dense


def datums(request: Message) -> list[Datum]:
    """The request's data as Bios datums (text chunks only; provenance spans are not used by
    any Bios loss and are dropped)."""
    data = []
    for i, datum in enumerate(request.data):
        tokens = []
        for j, chunk in enumerate(datum.model_input):
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise UnsupportedError(
                    f"data[{i}].model_input[{j}]: {kind} chunks are not supported; send token ids",
                    field=f"data[{i}].model_input",
                )
            tokens.append(np.frombuffer(chunk.encoded_text.tokens, np.dtype("<i4")))
        inputs = {
            name: TensorData.from_numpy(tensor_array(t, f"data[{i}].loss_fn_inputs.{name}"))
            for name, t in datum.loss_fn_inputs.items()
        }
        data.append(
            Datum(model_input=ModelInput.from_ints(np.concatenate(tokens) if tokens else []), loss_fn_inputs=inputs)
        )
    return data


def loss_config(request: Message) -> dict[str, float] | None:
    """The numeric loss settings (`loss_fn_config_v2` when present, else the legacy map);
    text settings (server-side custom losses) are unsupported."""
    if request.loss_fn_config_v2:
        config = {}
        for key, value in request.loss_fn_config_v2.items():
            if value.WhichOneof("value") != "number":
                raise UnsupportedError(
                    f"loss_fn_config.{key}: only numeric settings are supported", field=f"loss_fn_config.{key}"
                )
            config[key] = value.number
        return config
    return dict(request.loss_fn_config) or None


def _batched(arrays: list[np.ndarray], dtype: int) -> Message:
    """One `BatchedTensor` holding `arrays` (one per datum) back to back."""
    numpy_type = _NUMPY[dtype]
    parts = [np.ascontiguousarray(a, numpy_type) for a in arrays]
    offsets = np.zeros(len(parts) + 1, _INT64)
    np.cumsum([p.nbytes for p in parts], out=offsets[1:])
    batched = proto.BatchedTensor(data=b"".join(p.tobytes() for p in parts), offsets=offsets.tobytes(), dtype=dtype)
    batched.trailing_shape.extend(parts[0].shape[1:] if parts else ())
    return batched


def forward_backward_output(result: ForwardBackwardResult) -> bytes:
    """`result` as a serialised `ForwardBackwardOutput`: each per-datum output field packed in
    one `ArrayRecord`; metrics whose key is `name:reduction`, and `loss:sum` = the loss."""
    output = proto.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    if result.loss_fn_outputs:
        record = output.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(result.loss_fn_outputs))
        for name, first in result.loss_fn_outputs[0].items():
            dtype = proto.DTYPE_INT64 if first.dtype == "int64" else proto.DTYPE_FLOAT32
            record.fields[name].CopyFrom(_batched([datum[name].to_numpy() for datum in result.loss_fn_outputs], dtype))
    output.metrics.update({k: v for k, v in result.metrics.items() if k.count(":") == 1})
    output.metrics["loss:sum"] = result.loss
    return output.SerializeToString()


def sample_response(result: SampleResult, prompt_logprobs_last_n: int | None = None) -> bytes:
    """`result` as a serialised `SampleResponse`; prompt logprobs not computed (the first one,
    and all before the last `prompt_logprobs_last_n` when given) are NaN, and their top-k rows
    the SDK's sentinel (token 0, logprob `MASK_LOGPROB`)."""
    response = proto.SampleResponse(prompt_cache_hit_tokens=0)
    for sequence in result.sequences:
        response.sequences.add(
            stop_reason=proto.STOP_REASONS[sequence.stop_reason],
            tokens=np.asarray(sequence.tokens, np.dtype("<i4")).tobytes(),
            logprobs=np.asarray(sequence.logprobs, _NUMPY[proto.DTYPE_FLOAT32]).tobytes(),
        )
    if result.prompt_logprobs is not None:
        values = np.array([np.nan if x is None else x for x in result.prompt_logprobs], _NUMPY[proto.DTYPE_FLOAT32])
        if prompt_logprobs_last_n is not None:
            values[: max(values.size - prompt_logprobs_last_n, 0)] = np.nan
        response.prompt_logprobs = values.tobytes()
    if result.topk_prompt_logprobs is not None:
        _fill_topk(response.topk_prompt_logprobs, result.topk_prompt_logprobs, prompt_logprobs_last_n)
    return response.SerializeToString()


def _fill_topk(topk: Message, rows: list[list[tuple[int, float]] | None], last_n: int | None) -> None:
    """Write top-k prompt logprobs into the `TopkLogprobs` message `topk`: [T, k] token ids
    (int32) and logprobs (float32), rows not given (None, or before the last `last_n`) all
    sentinel."""
    k = max((len(row) for row in rows if row), default=0)
    ids, logprobs = np.zeros((len(rows), k), "<i4"), np.full((len(rows), k), MASK_LOGPROB, "<f4")
    first = 0 if last_n is None else max(len(rows) - last_n, 0)
    for t, row in enumerate(rows):
        if row and t >= first:
            ids[t, : len(row)] = [token for token, _ in row]
            logprobs[t, : len(row)] = [lp for _, lp in row]
    topk.token_ids, topk.logprobs, topk.k, topk.length = ids.tobytes(), logprobs.tobytes(), k, len(rows)
