"""Training runs: create, inspect, forward(/backward) and optimizer steps.

Every request of a run carries Tinker `seq_id` 1, 2, ...; it runs at engine sequence number
`seq_id - 1` of the run's Bios session, so the engine executes a run's requests strictly in
that order, holding a request until every earlier one has arrived (the SDK sends the first
chunk of a large forward_backward last). `(model_id, seq_id)` is the request's idempotency
key: a retry gets the original request back; the same key with another body is a 409. A
request refused before it reaches the engine gives up its sequence number (`RunRequest`).
Each route's planner (`resumable`) is also what runs the request again after a restart.
"""

from __future__ import annotations

from functools import partial
from typing import NoReturn

import zstandard
from fastapi import APIRouter, Depends, Header, Request
from google.protobuf.message import Message

from bios import wire
from bios.engine.engine import WithState
from bios.errors import BiosError, InvalidRequestError, NotFoundError, RequestTooLargeError, UnsupportedError
from bios.server import ledger
from bios.server.ledger import Bill
from bios.server.tinker import codec, ids
from bios.server.tinker.answers import json_answer, proto_answer
from bios.server.tinker.bodies import CreateModel, ModelRef, OptimStep, user_metadata
from bios.server.tinker.context import Plan, RunRequest, Tinker, TinkerDep, TinkerOwnerDep, done, resumable
from bios.server.tinker.tokenizers import tokenizer_directory
from bios.types import AdamParams, Datum, OptimStepResult

MAX_INFLATED_BYTES = 1 << 28
"""The largest forward_backward body accepted after zstd decompression."""

router = APIRouter()


async def raw_body(request: Request) -> bytes:
    return await request.body()


def inflate(body: bytes, content_encoding: str | None) -> bytes:
    """`body` decompressed per its Content-Encoding (none or zstd)."""
    if not content_encoding or content_encoding.strip().lower() == "identity":
        return body
    if content_encoding.strip().lower() != "zstd":
        raise InvalidRequestError(
            f"Content-Encoding: {content_encoding!r} is not supported (use zstd or none)", field="Content-Encoding"
        )
    try:
        inflated = zstandard.ZstdDecompressor().stream_reader(body).read(MAX_INFLATED_BYTES + 1)
    except zstandard.ZstdError as exc:
        raise InvalidRequestError(f"body: not valid zstd ({exc})", field="body") from None
    if len(inflated) > MAX_INFLATED_BYTES:
        raise RequestTooLargeError(
            f"body: more than {MAX_INFLATED_BYTES} bytes decompressed; send smaller chunks", field="body"
        )
    return inflated


def adam(body: OptimStep) -> AdamParams:
    """The Adam(W) settings of an optim_step; other optimizer families are unsupported."""
    if body.adam_params is None:
        kind = (body.optimizer_params or {}).get("type")
        raise UnsupportedError(
            f"optimizer {kind!r} is not supported; Bios steps with Adam(W) (AdamParams)", field="optimizer_params"
        )
    return AdamParams(**body.adam_params)


@resumable(CreateModel.model_validate_json, "create_model")
def plan_create_model(tinker: Tinker, who: str, body: CreateModel) -> Plan[str]:
    """A new LoRA training run `SESSION:train:MODEL_SEQ_ID` (Adam(W) only)."""
    lora = body.lora_config
    if lora is None:
        raise UnsupportedError(
            "lora_config: Bios trains LoRA adapters only; full fine-tuning is not supported", field="lora_config"
        )
    if (body.optimizer_config or {}).get("type", "adamw") != "adamw":
        raise UnsupportedError(
            f"optimizer_config: {body.optimizer_config} is not supported; Bios uses Adam(W)",
            field="optimizer_config",
        )
    model_id = ids.model_id(body.session_id, body.model_seq_id)
    metadata = user_metadata(body.user_metadata)
    start = lambda: done(
        tinker.new_run(who, model_id, lambda: tinker.engine.create_session(body.base_model, lora.to_bios()), metadata)
    )
    encode = json_answer(lambda mid: {"model_id": mid, "type": "create_model"})
    hashed = body.model_dump_json().encode()
    bill: Bill[str] = Bill(body.base_model, body.session_id)
    return Plan(who, "create_model", hashed, f"tinker/{model_id}", start, encode, model_id=model_id, bill=bill)


@router.post("/create_model")
def create_model(body: CreateModel, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    return tinker.accept(plan_create_model(tinker, who, body), body.model_dump_json().encode())


@router.post("/get_info")
def get_info(body: ModelRef, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """The run's model; `model_data.tokenizer_id` is a local directory `transformers` loads."""
    run = tinker.runs.get(who, body.model_id)
    engine = tinker.engine
    info = engine.session_info(run.session_id)
    directory = tokenizer_directory(
        tinker.home / "tinker" / "tokenizers", run.base_model, engine.tokenizer(run.base_model)
    )
    arch = engine.catalog.get(run.base_model).architecture
    return {
        "type": "get_info",
        "model_id": run.model_id,
        "is_lora": True,
        "lora_rank": info.lora_config.rank,
        "model_name": run.base_model,
        "optimizer_config": {"type": "adamw"},
        "model_data": {"arch": arch, "model_name": run.base_model, "tokenizer_id": str(directory)},
    }


@resumable(ModelRef.model_validate_json, "unload_model")
def plan_unload_model(tinker: Tinker, who: str, body: ModelRef) -> Plan:
    """Free the run's adapter once its running requests are done. The run and its checkpoints
    stay listed; later requests of the run are not found (unloading twice is harmless)."""
    run = tinker.runs.get(who, body.model_id)

    def unload() -> str:
        try:
            tinker.service.close_session(who, run.session_id)
        except NotFoundError:
            pass  # unloaded already
        return run.model_id

    encode = json_answer(lambda model_id: {"model_id": model_id, "type": "unload_model"})
    key = f"tinker/{run.model_id}/unload"
    return Plan(
        who, "unload_model", body.model_dump_json().encode(), key, lambda: done(unload()), encode, model_id=run.model_id
    )


@router.post("/unload_model")
def unload_model(body: ModelRef, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    return tinker.accept(plan_unload_model(tinker, who, body), body.model_dump_json().encode())


def _loss_inputs(request: Message) -> tuple[list[Datum], dict[str, float] | None]:
    """The datums and loss config of a `ForwardBackwardRequest`; server-side custom losses are unsupported."""
    if request.loss_fn == "custom":
        raise UnsupportedError(
            "loss_fn: server-side custom losses are not supported; pass a callable to forward_backward_custom",
            field="loss_fn",
        )
    return codec.datums(request), codec.loss_config(request)


@resumable(bytes, "forward_backward", "forward")
def plan_forward_backward(tinker: Tinker, who: str, raw: bytes) -> Plan:
    """A protobuf `ForwardBackwardRequest` (`forward_only` for `forward`), inflated; its result
    is a protobuf `ForwardBackwardOutput`. Refused loss inputs give up its sequence number."""
    request = codec.parse_forward_backward(raw)
    req = RunRequest.of(tinker, who, request.model_id, request.seq_id)
    backward = not request.forward_only
    kind = "forward_backward" if backward else "forward"
    encode = proto_answer(codec.forward_backward_output)
    try:
        data, config = _loss_inputs(request)
    except BiosError as refused:
        return req.plan(kind, raw, partial(req.ordered, partial(_raise, refused)), encode)
    start = lambda: tinker.engine.forward_backward(
        req.session_id, req.seq, data, request.loss_fn, config, backward=backward
    )
    replay = (
        wire.ForwardBackward(seq=req.seq, data=data, loss_fn=request.loss_fn, loss_fn_config=config)
        .model_dump_json()
        .encode()
        if backward
        else None
    )
    return req.plan(kind, raw, start, encode, replay=replay, meter=ledger.trained(data))


def _raise(error: BiosError) -> NoReturn:
    """Raise `error`: a refusal found while planning, raised when the request starts."""
    raise error


@router.post("/forward_backward")
def forward_backward(
    body: bytes = Depends(raw_body),
    content_encoding: str | None = Header(None),
    *,
    who: TinkerOwnerDep,
    tinker: TinkerDep,
) -> dict:
    raw = inflate(body, content_encoding)
    return tinker.accept(plan_forward_backward(tinker, who, raw), raw)


def _step_metrics(done: WithState[OptimStepResult]) -> dict:
    """The SDK's optim_step answer: the step's metrics, and its step number as a float under
    `optimizer_step` (not `step`, which tinker-cookbook's loops use for their own step count
    when they log these metrics)."""
    return {"metrics": {**done.result.metrics, "optimizer_step": float(done.result.step)}}


@resumable(OptimStep.model_validate_json, "optim_step")
def plan_optim_step(tinker: Tinker, who: str, body: OptimStep) -> Plan:
    """Adam(W) on the run's accumulated gradient, acknowledged once its state is in the journal."""
    req = RunRequest.of(tinker, who, body.model_id, body.seq_id)
    start = lambda: tinker.engine.optim_step_and_export(req.session_id, req.seq, req.ordered(lambda: adam(body)))
    record = tinker.service.durable_recorder(req.session_id, req.seq)
    raw = body.model_dump_json().encode()
    return req.plan("optim_step", raw, start, json_answer(_step_metrics), record=record, meter=ledger.step)


@router.post("/optim_step")
def optim_step(body: OptimStep, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    return tinker.accept(plan_optim_step(tinker, who, body), body.model_dump_json().encode())
