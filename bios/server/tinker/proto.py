"""The protobuf messages of the Tinker SDK's `tinker_public` package, built at import time.

The SDK posts `ForwardBackwardRequest` and reads `ForwardBackwardOutput` and `SampleResponse`.
Their schema is written out below as a table (message -> fields with number, type and oneof),
turned into a `FileDescriptorProto` exactly as protoc lays one out (map entries as nested
`...Entry` types, proto3 `optional` as synthetic `_name` oneofs after the real ones), and
compiled into classes in a private descriptor pool, so no `protoc` is needed and a process
that also imports the SDK's own generated module sees no clash. Field numbers and types
equal the SDK's descriptor (tests/server/test_tinker_sdk.py compares them message by message).
The SDK's unused `SamplingParams` / `StopStrings` / `StopTokens` are left out.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

PACKAGE = "tinker_public"
FILE_NAME = "tinker_public.proto"

ENUMS: dict[str, tuple[str, ...]] = {
    "StopReason": ("STOP_REASON_STOP", "STOP_REASON_LENGTH"),
    "DType": ("DTYPE_UNSPECIFIED", "DTYPE_FLOAT32", "DTYPE_INT64", "DTYPE_INT32", "DTYPE_BFLOAT16"),
}

# name -> [(field, number, type, oneof)]; type is "[repeated |optional ]T" or "map<K,V>",
# T a scalar below or a message/enum of this file; oneof names a real oneof or is None.
MESSAGES: dict[str, list[tuple[str, int, str, str | None]]] = {
    "SampleResponse": [
        ("sequences", 1, "repeated SampledSequence", None),
        ("prompt_logprobs", 2, "optional bytes", None),
        ("topk_prompt_logprobs", 3, "optional TopkLogprobs", None),
        ("prompt_cache_hit_tokens", 4, "int32", None),
        ("target_prompt_logprobs", 5, "optional Tensor", None),
        ("prompt_alt_tokens", 6, "optional PromptAltTokens", None),
    ],
    "PromptAltTokens": [("tokens", 1, "Tensor", None), ("logprobs", 2, "Tensor", None)],
    "SampledSequence": [
        ("stop_reason", 1, "StopReason", None),
        ("tokens", 2, "bytes", None),
        ("logprobs", 3, "optional bytes", None),
        ("topk_sampled_logprobs", 4, "optional TopkLogprobs", None),
    ],
    "TopkLogprobs": [
        ("token_ids", 1, "bytes", None),
        ("logprobs", 2, "bytes", None),
        ("k", 3, "uint32", None),
        ("length", 4, "uint32", None),
    ],
    "SparseCsr": [("values", 1, "bytes", None), ("crow_indices", 2, "bytes", None), ("col_indices", 3, "bytes", None)],
    "Tensor": [
        ("dense", 1, "bytes", "encoding"),
        ("sparse_csr", 2, "SparseCsr", "encoding"),
        ("dtype", 3, "DType", None),
        ("shape", 4, "repeated int64", None),
    ],
    "BatchedTensor": [
        ("data", 1, "bytes", None),
        ("offsets", 2, "bytes", None),
        ("dtype", 3, "DType", None),
        ("trailing_shape", 4, "repeated int64", None),
    ],
    "ArrayRecord": [
        ("type_tag", 1, "string", None),
        ("fields", 2, "map<string,BatchedTensor>", None),
        ("num_datums", 3, "int64", None),
    ],
    "ForwardBackwardOutput": [
        ("loss_fn_output_type", 1, "string", None),
        ("loss_fn_outputs", 2, "repeated ArrayRecord", None),
        ("metrics", 3, "map<string,double>", None),
    ],
    "ForwardBackwardRequest": [
        ("model_id", 1, "string", None),
        ("seq_id", 2, "int32", None),
        ("data", 3, "repeated Datum", None),
        ("loss_fn", 4, "string", None),
        ("loss_fn_config", 5, "map<string,double>", None),
        ("forward_only", 6, "bool", None),
        ("loss_fn_config_v2", 7, "map<string,LossConfigValue>", None),
    ],
    "LossConfigValue": [("number", 1, "double", "value"), ("text", 2, "string", "value")],
    "Datum": [
        ("model_input", 1, "repeated Chunk", None),
        ("loss_fn_inputs", 2, "map<string,Tensor>", None),
        ("model_input_spans", 3, "repeated ProvenanceSpan", None),
        ("loss_fn_input_spans", 4, "repeated ProvenanceSpan", None),
    ],
    "ProvenanceSpan": [
        ("prompt_tokens", 1, "PromptProvenanceSpan", "span"),
        ("sampled_tokens", 2, "SampledProvenanceSpan", "span"),
    ],
    "PromptProvenanceSpan": [
        ("sequence_id", 1, "string", None),
        ("offset", 2, "int64", None),
        ("length", 3, "int64", None),
    ],
    "SampledProvenanceSpan": [
        ("sequence_id", 1, "string", None),
        ("offset", 2, "int64", None),
        ("length", 3, "int64", None),
    ],
    "Chunk": [
        ("encoded_text", 1, "EncodedTextChunk", "chunk"),
        ("image", 2, "ImageChunk", "chunk"),
        ("dmel", 3, "DmelChunk", "chunk"),
    ],
    "EncodedTextChunk": [("tokens", 1, "bytes", None)],
    "ImageChunk": [
        ("data", 1, "bytes", None),
        ("format", 2, "string", None),
        ("expected_tokens", 3, "optional int32", None),
        ("override_dimensions", 4, "optional ImageDimensions", None),
    ],
    "ImageDimensions": [("width", 1, "uint32", None), ("height", 2, "uint32", None)],
    "DmelChunk": [("dmel", 1, "bytes", None)],
}

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "bytes": _F.TYPE_BYTES,
    "string": _F.TYPE_STRING,
    "bool": _F.TYPE_BOOL,
    "double": _F.TYPE_DOUBLE,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
}


def _typed(field: descriptor_pb2.FieldDescriptorProto, type_name: str) -> None:
    """Set `field`'s type to the scalar, enum or message called `type_name`."""
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    else:
        field.type = _F.TYPE_ENUM if type_name in ENUMS else _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{type_name}"


def _message(name: str, fields: list[tuple[str, int, str, str | None]]) -> descriptor_pb2.DescriptorProto:
    """The DescriptorProto protoc writes for message `name` with `fields`."""
    message = descriptor_pb2.DescriptorProto(name=name)
    real_oneofs = list(dict.fromkeys(oneof for *_, oneof in fields if oneof))
    message.oneof_decl.extend(descriptor_pb2.OneofDescriptorProto(name=o) for o in real_oneofs)
    for field_name, number, spec, oneof in fields:
        field = message.field.add(name=field_name, number=number, label=_F.LABEL_OPTIONAL)
        if spec.startswith("map<"):
            key, value = spec[4:-1].split(",")
            entry = message.nested_type.add(name="".join(p.capitalize() for p in field_name.split("_")) + "Entry")
            entry.options.map_entry = True
            _typed(entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL), key)
            _typed(entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL), value)
            field.label, field.type, field.type_name = (
                _F.LABEL_REPEATED,
                _F.TYPE_MESSAGE,
                f".{PACKAGE}.{name}.{entry.name}",
            )
            continue
        modifier, _, type_name = spec.rpartition(" ")
        _typed(field, type_name)
        if modifier == "repeated":
            field.label = _F.LABEL_REPEATED
        if oneof:
            field.oneof_index = real_oneofs.index(oneof)
    for field, (_, _, spec, _) in zip(message.field, fields):
        if spec.startswith("optional "):  # proto3 optional: a synthetic oneof after the real ones
            field.oneof_index, field.proto3_optional = len(message.oneof_decl), True
            message.oneof_decl.add(name=f"_{field.name}")
    return message


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The schema as a FileDescriptorProto (proto3, package `tinker_public`)."""
    file = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto3")
    file.message_type.extend(_message(name, fields) for name, fields in MESSAGES.items())
    for name, values in ENUMS.items():
        file.enum_type.add(
            name=name, value=[descriptor_pb2.EnumValueDescriptorProto(name=v, number=i) for i, v in enumerate(values)]
        )
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(file_descriptor())


def message_class(name: str) -> type[Message]:
    """The generated class of message `name` (e.g. "ForwardBackwardRequest")."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ForwardBackwardRequest = message_class("ForwardBackwardRequest")
ForwardBackwardOutput = message_class("ForwardBackwardOutput")
SampleResponse = message_class("SampleResponse")
BatchedTensor = message_class("BatchedTensor")

STOP_REASONS = {
    "stop": ENUMS["StopReason"].index("STOP_REASON_STOP"),
    "length": ENUMS["StopReason"].index("STOP_REASON_LENGTH"),
}
"""Bios stop reasons -> `StopReason` numbers."""
DTYPE_FLOAT32, DTYPE_INT64 = ENUMS["DType"].index("DTYPE_FLOAT32"), ENUMS["DType"].index("DTYPE_INT64")
