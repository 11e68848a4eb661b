"""Training runs: create, inspect, forward(/backward), optimizer steps, save and load.

Every request of a run carries Tinker `seq_id` 1, 2, ...; it runs at engine sequence number
`seq_id - 1` of the run's Bios session, so the engine executes a run's requests strictly in
that order, holding a request until every earlier one has arrived (the SDK sends the first
chunk of a large forward_backward last). `(model_id, seq_id)` is the request's idempotency
key: a retry gets the original request back; the same key with another body is a 409. A
request refused before it reaches the engine gives up its sequence number.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import zstandard
from fastapi import APIRouter, Depends, Header, Request

from bios import wire
from bios.engine.checkpoints import checkpoint_path
from bios.errors import BiosError, InvalidRequestError, NotFoundError, RequestTooLargeError, UnsupportedError
from bios.server.tinker import codec, ids
from bios.server.tinker.answers import json_answer, proto_answer
from bios.server.tinker.bodies import (
    CreateModel,
    LoadWeights,
    ModelRef,
    OptimStep,
    SaveForSampler,
    SaveWeights,
    user_metadata,
)
from bios.server.tinker.context import Tinker, done
from bios.server.tinker.ids import Run
from bios.server.tinker.sessions import Sampler
from bios.server.tinker.tokenizers import tokenizer_directory
from bios.types import AdamParams, StateResult

MAX_INFLATED_BYTES = 1 << 28
"""The largest forward_backward body accepted after zstd decompression."""


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


def add_training_routes(router: APIRouter, tinker: Tinker) -> None:
    owner = Depends(tinker.owner)
    service, engine, runs = tinker.service, tinker.engine, tinker.runs

    def submitted(run: Run, request_id: str) -> dict:
        return {"request_id": request_id, "model_id": run.model_id}

    def run_key(run: Run, seq_id: int | None) -> str:
        return f"tinker/{run.model_id}/{seq_id}"

    def tinker_path(result: StateResult) -> str:
        return runs.tinker_path(result.path)

    def saved(path: str) -> bool:
        try:
            return engine.store.record(path) is not None
        except NotFoundError:
            return False

    @router.post("/create_model")
    def create_model(body: CreateModel, who: str = owner) -> dict:
        """A new LoRA training run `SESSION:train:MODEL_SEQ_ID` (Adam(W) only)."""
        tinker.sessions.check(who, body.session_id)
        if body.lora_config is None:
            raise UnsupportedError(
                "lora_config: Bios trains LoRA adapters only; full fine-tuning is not supported", field="lora_config"
            )
        if (body.optimizer_config or {}).get("type", "adamw") != "adamw":
            raise UnsupportedError(
                f"optimizer_config: {body.optimizer_config} is not supported; Bios uses Adam(W)",
                field="optimizer_config",
            )
        model_id = ids.model_id(body.session_id, body.model_seq_id)

        def start():
            info = engine.create_session(body.base_model, body.lora_config.to_bios())
            return done(tinker.open_run(who, model_id, info, user_metadata(body.user_metadata)).model_id)

        encode = json_answer(lambda mid: {"model_id": mid, "type": "create_model"})
        return {
            "request_id": tinker.submit(
                who, "create_model", body.model_dump_json().encode(), f"tinker/{model_id}", start, encode
            ),
            "model_id": model_id,
        }

    @router.post("/get_info")
    def get_info(body: ModelRef, who: str = owner) -> dict:
        """The run's model; `model_data.tokenizer_id` is a local directory `transformers` loads."""
        run = runs.get(who, body.model_id)
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

    @router.post("/forward_backward")
    def forward_backward(
        body: bytes = Depends(raw_body), content_encoding: str | None = Header(None), who: str = owner
    ) -> dict:
        """A protobuf `ForwardBackwardRequest` (`forward_only` for `forward`); its result is a
        protobuf `ForwardBackwardOutput`."""
        raw = inflate(body, content_encoding)
        request = codec.parse_forward_backward(raw)
        run = runs.get(who, request.model_id)
        seq = ids.engine_seq(request.seq_id)

        def prepare():
            if request.loss_fn == "custom":
                raise UnsupportedError(
                    "loss_fn: server-side custom losses are not supported; pass a callable to forward_backward_custom",
                    field="loss_fn",
                )
            return codec.datums(request), codec.loss_config(request)

        data, config = tinker.ordered(run, seq, prepare)
        backward = not request.forward_only
        start = lambda: engine.forward_backward(run.session_id, seq, data, request.loss_fn, config, backward=backward)
        replay = (
            wire.ForwardBackward(seq=seq, data=data, loss_fn=request.loss_fn, loss_fn_config=config)
            .model_dump_json()
            .encode()
            if backward
            else None
        )
        kind = "forward_backward" if backward else "forward"
        encode = proto_answer(codec.forward_backward_output)
        return submitted(
            run,
            tinker.submit(who, kind, raw, run_key(run, request.seq_id), start, encode, run=run, seq=seq, replay=replay),
        )

    @router.post("/optim_step")
    def optim_step(body: OptimStep, who: str = owner) -> dict:
        run = runs.get(who, body.model_id)
        seq = ids.engine_seq(body.seq_id)
        encode = json_answer(lambda done: {"metrics": {**done.result.metrics, "step": float(done.result.step)}})
        start = lambda: engine.optim_step_and_export(run.session_id, seq, tinker.ordered(run, seq, lambda: adam(body)))
        record = service.durable_recorder(run.session_id, seq)
        return submitted(
            run,
            tinker.submit(
                who,
                "optim_step",
                body.model_dump_json().encode(),
                run_key(run, body.seq_id),
                start,
                encode,
                run=run,
                seq=seq,
                record=record,
            ),
        )

    @router.post("/save_weights")
    def save_weights(body: SaveWeights, who: str = owner) -> dict:
        """save_state: weights + optimizer state as `tinker://RUN/weights/NAME`. TTLs are not
        enforced: a checkpoint stays until it is deleted."""
        run = runs.get(who, body.model_id)
        seq = ids.engine_seq(body.seq_id)

        def prepare() -> str:
            if not body.path:
                raise InvalidRequestError("path: name the checkpoint", field="path")
            if not body.overwrite and saved(checkpoint_path(run.session_id, "state", body.path)):
                raise InvalidRequestError(
                    f"path: checkpoint {body.path!r} exists; pass overwrite=True to replace it", field="path"
                )
            return body.path

        start = lambda: engine.save_state(
            run.session_id, seq, tinker.ordered(run, seq, prepare), user_metadata(body.user_metadata), "state"
        )
        encode = json_answer(lambda r: {"path": tinker_path(r), "type": "save_weights"})
        record = service.checkpoint_recorder(who, run.session_id)
        return submitted(
            run,
            tinker.submit(
                who,
                "save_weights",
                body.model_dump_json().encode(),
                run_key(run, body.seq_id),
                start,
                encode,
                run=run,
                seq=seq,
                record=record,
            ),
        )

    @router.post("/save_weights_for_sampler")
    def save_weights_for_sampler(body: SaveForSampler, who: str = owner) -> dict:
        """Named: a persistent sampler checkpoint `tinker://RUN/sampler_weights/NAME`. Unnamed
        (save_weights_and_get_sampling_client): a sampling session on a snapshot of the current
        weights, released with the client's session and kept in no checkpoint."""
        run = runs.get(who, body.model_id)
        seq = ids.engine_seq(body.seq_id)
        key, hashed = run_key(run, body.seq_id), body.model_dump_json(exclude={"sampling_session_seq_id"}).encode()
        if body.path:
            start = lambda: engine.save_state(
                run.session_id, seq, body.path, user_metadata(body.user_metadata), "sampler"
            )
            encode = json_answer(lambda r: {"path": tinker_path(r), "type": "save_weights_for_sampler"})
            record = service.checkpoint_recorder(who, run.session_id)
            return submitted(
                run, tinker.submit(who, "save_for_sampler", hashed, key, start, encode, run=run, seq=seq, record=record)
            )
        session_id = ids.session_of(run.model_id)

        def sampler_on(saved: StateResult) -> str:
            try:
                handle = engine.create_sampler(model_path=saved.path)
            finally:
                engine.delete_checkpoint(saved.path)  # the snapshot adapter holds the weights now
            service.add_sampler(handle.sampler_id, who)
            try:
                return tinker.sessions.add_sampler(
                    Sampler(handle.sampler_id, who, session_id, handle.base_model, None), key
                )
            except BiosError:
                service.drop_sampler(who, handle.sampler_id)
                raise

        def start():
            tinker.ordered(run, seq, lambda: tinker.sessions.check(who, session_id))
            return tinker.then(
                engine.save_state(run.session_id, seq, f"ephemeral-{uuid.uuid4().hex}", {}, "sampler"), sampler_on
            )

        encode = json_answer(lambda sampler_id: {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"})
        return submitted(run, tinker.submit(who, "save_for_sampler", hashed, key, start, encode, run=run, seq=seq))

    @router.post("/save_weights_external")
    def save_weights_external(body: SaveWeights, who: str = owner) -> dict:
        """Unsupported (Bios does not export merged Hugging Face weights); gives up its seq_id."""
        run = runs.get(who, body.model_id)
        seq = ids.engine_seq(body.seq_id)

        def refuse() -> None:
            raise UnsupportedError(
                "save_weights_external: exporting Hugging Face weights is not "
                "supported by Bios; use save_weights_for_sampler (a PEFT LoRA adapter)",
                field="path",
            )

        start = lambda: tinker.ordered(run, seq, refuse)
        return submitted(
            run,
            tinker.submit(
                who,
                "save_external",
                body.model_dump_json().encode(),
                run_key(run, body.seq_id),
                start,
                json_answer(dict),
                run=run,
                seq=seq,
            ),
        )

    @router.post("/load_weights")
    def load_weights(body: LoadWeights, who: str = owner) -> dict:
        """With `model_id` + `seq_id`: load_state into the run. With `session_id` +
        `model_seq_id`: a new run `SESSION:train:MODEL_SEQ_ID` resumed from the checkpoint.
        `optimizer` false loads the weights only, with a fresh optimizer."""

        def loaded(model_id: str) -> Callable[[object], bytes]:
            return json_answer(lambda _: {"path": body.path, "model_id": model_id, "type": "load_weights"})

        if body.model_id is not None:
            run = runs.get(who, body.model_id)
            seq = ids.engine_seq(body.seq_id)

            def start():
                source = tinker.ordered(run, seq, lambda: checkpoint_to_load(who, body))
                return engine.load_state_and_export(run.session_id, seq, source, optimizer=body.optimizer)

            record = service.durable_recorder(run.session_id, seq)
            return submitted(
                run,
                tinker.submit(
                    who,
                    "load_weights",
                    body.model_dump_json().encode(),
                    run_key(run, body.seq_id),
                    start,
                    loaded(run.model_id),
                    run=run,
                    seq=seq,
                    record=record,
                ),
            )
        if body.session_id is None or body.model_seq_id is None:
            raise InvalidRequestError(
                "load_weights: give model_id and seq_id, or session_id and model_seq_id", field="model_id"
            )
        tinker.sessions.check(who, body.session_id)
        model_id = ids.model_id(body.session_id, body.model_seq_id)

        def create():
            info = engine.create_session_from_state(
                checkpoint_to_load(who, body), body.base_model, optimizer=body.optimizer
            )
            return done(tinker.open_run(who, model_id, info, user_metadata(body.user_metadata)).model_id)

        return {
            "request_id": tinker.submit(
                who, "load_weights", body.model_dump_json().encode(), f"tinker/{model_id}", create, loaded(model_id)
            ),
            "model_id": model_id,
        }

    def checkpoint_to_load(who: str, body: LoadWeights) -> str:
        """The Bios path of the caller's checkpoint `body.path` (NotFoundError for another key's)."""
        if body.weights_access_token is not None:
            raise UnsupportedError(
                "weights_access_token: Bios loads only checkpoints of the caller's own key",
                field="weights_access_token",
            )
        try:
            return service.check_checkpoint(who, runs.bios_path(who, body.path))
        except NotFoundError:
            raise NotFoundError(f"path: no checkpoint at {body.path}", field="path") from None
