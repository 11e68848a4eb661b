"""The remote transport: the `Transport` protocol carried over HTTP to `bios serve` (`bios.wire`).

Every call is a coroutine on the transport's own event loop, sent once by its `Connection`
(bios.transport.connection; retrying is `bios.retry`'s): a sync method waits for it, its
`*_async` twin awaits it without blocking the caller's loop. Work methods return a
`concurrent.futures.Future` once the server has taken the request; a task on the loop
long-polls its answer, and the future resolves with it.

Arguments are checked here with the checks the engine uses (`bios.validation`) before anything
is sent, so a bad argument raises the same error as in-process; an ordered request refused for
good releases its sequence number on the server.

Imports the contract layer and the wire only, never the engine.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from pydantic import BaseModel, TypeAdapter

from bios import validation, wire
from bios.clock import Clock
from bios.errors import BiosError, InvalidRequestError
from bios.handles import SamplerHandle
from bios.losses import loss_spec
from bios.tokenizer import Tokenizer
from bios.transport.connection import Connection, Decode
from bios.types import (
    AdamParams,
    CheckpointKind,
    Datum,
    ExternalWeightsUrls,
    ForwardBackwardResult,
    LoraConfig,
    ModelInput,
    OptimStepResult,
    SampleResult,
    SamplingParams,
    ServerCapabilities,
    StateResult,
    TrainingInfo,
    WeightsInfo,
)

_LOGPROBS = TypeAdapter(list[float | None])
_CHECKPOINTS = TypeAdapter(list[StateResult])
_SESSIONS = TypeAdapter(list[TrainingInfo])


class HttpTransport:
    """The service of a Bios server at `base_url`, as a `bios.transport.Transport`.

    `max_polls` long-polls run at once (each holds a connection for up to `wire.MAX_WAIT_S`);
    later ones wait their turn. `close()` ends the loop and its connections; a transport that
    is no longer referenced is closed too.
    """

    def __init__(self, base_url: str, api_key: str | None, *, max_polls: int = 64) -> None:
        self._wire = Connection(base_url, api_key, max_polls=max_polls)
        self._loop = self._wire.loop
        self.base_url = self._wire.base_url
        self._tokenizers: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()

    @property
    def clock(self) -> Clock:
        """A simulating server's simulated time (at its time scale; with scale 0 a retry goes out
        at once), else real time. The transport asks the server before its first call; until it
        has heard (e.g. while the server is unreachable) this is real time."""
        return self._wire.clock

    def close(self) -> None:
        """Cancel the requests in flight (their futures fail), close the connections, stop the loop."""
        self._wire.close()

    # ---- discovery ------------------------------------------------------------------------

    def capabilities(self) -> ServerCapabilities:
        return self._loop.wait(self._wire.capabilities())

    async def capabilities_async(self) -> ServerCapabilities:
        return await self._loop.run(self._wire.capabilities())

    def tokenizer(self, base_model: str) -> Tokenizer:
        with self._lock:
            cached = self._tokenizers.get(base_model)
        if cached is None:
            response = self._loop.wait(self._wire.send("GET", f"/v1/tokenizers/{base_model}"))
            cached = Tokenizer.from_wire(response.json())
            with self._lock:
                self._tokenizers[base_model] = cached
        return cached

    # ---- sessions -------------------------------------------------------------------------

    def create_session(
        self, base_model: str, lora: LoraConfig, user_metadata: dict[str, str] | None = None
    ) -> TrainingInfo:
        return self._loop.wait(self._create_session(base_model, lora, user_metadata))

    async def create_session_async(
        self, base_model: str, lora: LoraConfig, user_metadata: dict[str, str] | None = None
    ) -> TrainingInfo:
        return await self._loop.run(self._create_session(base_model, lora, user_metadata))

    async def _create_session(self, base_model: str, lora: LoraConfig, user_metadata: object) -> TrainingInfo:
        body = wire.CreateSession(
            base_model=str(base_model),
            lora_config=validation.instance(lora, LoraConfig, "lora_config"),
            user_metadata=validation.user_metadata(user_metadata),
        )
        return TrainingInfo.model_validate((await self._wire.post("/v1/sessions", body)).json())

    def create_session_from_state(
        self,
        path: str | os.PathLike,
        base_model: str | None = None,
        *,
        optimizer: bool = True,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingInfo:
        return self._loop.wait(self._session_from_state(path, base_model, optimizer, user_metadata))

    async def create_session_from_state_async(
        self,
        path: str | os.PathLike,
        base_model: str | None = None,
        *,
        optimizer: bool = True,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingInfo:
        return await self._loop.run(self._session_from_state(path, base_model, optimizer, user_metadata))

    async def _session_from_state(
        self, path: object, base_model: str | None, optimizer: bool, user_metadata: object
    ) -> TrainingInfo:
        body = wire.SessionFromState(
            path=_text(path, "path"),
            base_model=base_model,
            optimizer=optimizer,
            user_metadata=validation.user_metadata(user_metadata),
        )
        return TrainingInfo.model_validate((await self._wire.post("/v1/sessions/from_state", body)).json())

    def session_info(self, session_id: str) -> TrainingInfo:
        return self._loop.wait(self._session_info(session_id))

    async def session_info_async(self, session_id: str) -> TrainingInfo:
        return await self._loop.run(self._session_info(session_id))

    async def _session_info(self, session_id: str) -> TrainingInfo:
        return TrainingInfo.model_validate((await self._wire.send("GET", f"/v1/sessions/{session_id}")).json())

    def close_session(self, session_id: str) -> None:
        self._loop.spawn(self._wire.delete_quietly(f"/v1/sessions/{session_id}"))

    def next_seq(self, session_id: str) -> int:
        return self._loop.wait(self._next_seq(session_id))

    async def next_seq_async(self, session_id: str) -> int:
        return await self._loop.run(self._next_seq(session_id))

    async def _next_seq(self, session_id: str) -> int:
        response = await self._wire.send("GET", f"/v1/sessions/{session_id}/next_seq")
        return wire.NextSeq.model_validate_json(response.content).next_seq

    def skip(self, session_id: str, seq: int) -> None:
        self._loop.wait(self._skip(session_id, seq))

    async def skip_async(self, session_id: str, seq: int) -> None:
        await self._loop.run(self._skip(session_id, seq))

    async def _skip(self, session_id: str, seq: int) -> None:
        await self._wire.post(f"/v1/sessions/{session_id}/skip", wire.Ordered(seq=seq))

    # ---- work on a session ------------------------------------------------------------------

    def forward_backward(
        self,
        session_id: str,
        seq: int,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
        *,
        backward: bool = True,
        step_follows: bool = False,
    ) -> Future[ForwardBackwardResult]:
        """The server takes each request as it comes: `step_follows` changes nothing here."""
        return self._loop.wait(self._forward_backward(session_id, seq, data, loss_fn, loss_fn_config, backward))

    async def forward_backward_async(
        self,
        session_id: str,
        seq: int,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
        *,
        backward: bool = True,
        step_follows: bool = False,
    ) -> Future[ForwardBackwardResult]:
        return await self._loop.run(self._forward_backward(session_id, seq, data, loss_fn, loss_fn_config, backward))

    async def _forward_backward(
        self,
        session_id: str,
        seq: int,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: dict[str, float] | None,
        backward: bool,
    ) -> Future[ForwardBackwardResult]:
        def body() -> wire.ForwardBackward:
            checked = validation.datum_list(data)
            loss_spec(loss_fn).resolve_config(validation.config_dict(loss_fn_config))
            return wire.ForwardBackward(
                seq=seq, data=checked, loss_fn=loss_fn, loss_fn_config=loss_fn_config, backward=backward
            )

        return await self._ordered(session_id, seq, "forward_backward", body, ForwardBackwardResult.model_validate)

    def optim_step(
        self, session_id: str, seq: int, adam: AdamParams, *, after_forward: bool = False
    ) -> Future[OptimStepResult]:
        return self._loop.wait(self._optim_step(session_id, seq, adam, after_forward))

    async def optim_step_async(
        self, session_id: str, seq: int, adam: AdamParams, *, after_forward: bool = False
    ) -> Future[OptimStepResult]:
        return await self._loop.run(self._optim_step(session_id, seq, adam, after_forward))

    async def _optim_step(
        self, session_id: str, seq: int, adam: AdamParams, after_forward: bool
    ) -> Future[OptimStepResult]:
        body = lambda: wire.OptimStep(
            seq=seq, adam_params=validation.instance(adam, AdamParams, "adam_params"), after_forward=after_forward
        )
        return await self._ordered(session_id, seq, "optim_step", body, OptimStepResult.model_validate)

    def sample(
        self, session_id: str, seq: int, prompt: ModelInput, params: SamplingParams, num_samples: int = 1
    ) -> Future[SampleResult]:
        return self._loop.wait(self._sample(session_id, seq, prompt, params, num_samples))

    async def sample_async(
        self, session_id: str, seq: int, prompt: ModelInput, params: SamplingParams, num_samples: int = 1
    ) -> Future[SampleResult]:
        return await self._loop.run(self._sample(session_id, seq, prompt, params, num_samples))

    async def _sample(
        self, session_id: str, seq: int, prompt: ModelInput, params: SamplingParams, num_samples: int
    ) -> Future[SampleResult]:
        body = lambda: wire.SessionSample(seq=seq, **_sample_fields(prompt, params, num_samples))
        return await self._ordered(session_id, seq, "sample", body, SampleResult.model_validate)

    def save_state(
        self,
        session_id: str,
        seq: int,
        name: str,
        metadata: dict | None = None,
        kind: CheckpointKind = "state",
        ttl_seconds: float | None = None,
        merged: str | None = None,
    ) -> Future[StateResult]:
        return self._loop.wait(self._save_state(session_id, seq, name, metadata, kind, ttl_seconds, merged))

    async def save_state_async(
        self,
        session_id: str,
        seq: int,
        name: str,
        metadata: dict | None = None,
        kind: CheckpointKind = "state",
        ttl_seconds: float | None = None,
        merged: str | None = None,
    ) -> Future[StateResult]:
        return await self._loop.run(self._save_state(session_id, seq, name, metadata, kind, ttl_seconds, merged))

    async def _save_state(
        self,
        session_id: str,
        seq: int,
        name: str,
        metadata: dict | None,
        kind: CheckpointKind,
        ttl_seconds: float | None,
        merged: str | None,
    ) -> Future[StateResult]:
        def body() -> wire.SaveState:
            checked, meta = validation.checkpoint_name(name), validation.metadata(metadata)
            ttl, dtype = validation.ttl_seconds(ttl_seconds), validation.merged_dtype(merged, kind)
            return wire.SaveState(seq=seq, name=checked, metadata=meta, kind=kind, ttl_seconds=ttl, merged=dtype)

        return await self._ordered(session_id, seq, "save_state", body, StateResult.model_validate)

    def load_state(self, session_id: str, seq: int, path: str, *, optimizer: bool = True) -> Future[TrainingInfo]:
        return self._loop.wait(self._load_state(session_id, seq, path, optimizer))

    async def load_state_async(
        self, session_id: str, seq: int, path: str, *, optimizer: bool = True
    ) -> Future[TrainingInfo]:
        return await self._loop.run(self._load_state(session_id, seq, path, optimizer))

    async def _load_state(self, session_id: str, seq: int, path: str, optimizer: bool) -> Future[TrainingInfo]:
        def body() -> wire.LoadState:
            validation.parse_path(path)
            return wire.LoadState(seq=seq, path=path, optimizer=optimizer)

        return await self._ordered(session_id, seq, "load_state", body, TrainingInfo.model_validate)

    # ---- sampling clients -------------------------------------------------------------------

    def create_sampler(self, model_path: str | None = None, base_model: str | None = None) -> SamplerHandle:
        return self._loop.wait(self._create_sampler(model_path, base_model))

    async def create_sampler_async(self, model_path: str | None = None, base_model: str | None = None) -> SamplerHandle:
        return await self._loop.run(self._create_sampler(model_path, base_model))

    async def _create_sampler(self, model_path: str | None, base_model: str | None) -> SamplerHandle:
        body = wire.CreateSampler(
            model_path=None if model_path is None else _text(model_path, "model_path"),
            base_model=None if base_model is None else str(base_model),
        )
        made = wire.Sampler.model_validate_json((await self._wire.post("/v1/samplers", body)).content)
        return SamplerHandle(made.sampler_id, made.base_model)

    def release_sampler(self, sampler_id: str) -> None:
        self._loop.spawn(self._wire.delete_quietly(f"/v1/samplers/{sampler_id}"))

    def sampler_sample(
        self,
        sampler_id: str,
        prompt: ModelInput,
        params: SamplingParams,
        num_samples: int = 1,
        *,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Future[SampleResult]:
        return self._loop.wait(
            self._sampler_sample(sampler_id, prompt, params, num_samples, prompt_logprobs, topk_prompt_logprobs)
        )

    async def sampler_sample_async(
        self,
        sampler_id: str,
        prompt: ModelInput,
        params: SamplingParams,
        num_samples: int = 1,
        *,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Future[SampleResult]:
        return await self._loop.run(
            self._sampler_sample(sampler_id, prompt, params, num_samples, prompt_logprobs, topk_prompt_logprobs)
        )

    async def _sampler_sample(
        self,
        sampler_id: str,
        prompt: ModelInput,
        params: SamplingParams,
        num_samples: int,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
    ) -> Future[SampleResult]:
        body = wire.SamplerSample(
            **_sample_fields(prompt, params, num_samples),
            prompt_logprobs=prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
        )
        return await self._wire.submit(f"/v1/samplers/{sampler_id}/sample", body, SampleResult.model_validate)

    def sampler_logprobs(self, sampler_id: str, prompt: ModelInput) -> Future[list[float | None]]:
        return self._loop.wait(self._sampler_logprobs(sampler_id, prompt))

    async def sampler_logprobs_async(self, sampler_id: str, prompt: ModelInput) -> Future[list[float | None]]:
        return await self._loop.run(self._sampler_logprobs(sampler_id, prompt))

    async def _sampler_logprobs(self, sampler_id: str, prompt: ModelInput) -> Future[list[float | None]]:
        body = wire.SamplerLogprobs(prompt=validation.instance(prompt, ModelInput, "prompt"))
        return await self._wire.submit(f"/v1/samplers/{sampler_id}/logprobs", body, _LOGPROBS.validate_python)

    # ---- checkpoints ------------------------------------------------------------------------

    def list_checkpoints(self, session_id: str | None = None) -> list[StateResult]:
        return self._loop.wait(self._list_checkpoints(session_id))

    async def list_checkpoints_async(self, session_id: str | None = None) -> list[StateResult]:
        return await self._loop.run(self._list_checkpoints(session_id))

    async def _list_checkpoints(self, session_id: str | None) -> list[StateResult]:
        params = {"session_id": session_id} if session_id else None
        return _CHECKPOINTS.validate_json((await self._wire.send("GET", "/v1/checkpoints", params=params)).content)

    def delete_checkpoint(self, path: str) -> None:
        self._loop.wait(self._delete_checkpoint(path))

    async def delete_checkpoint_async(self, path: str) -> None:
        await self._loop.run(self._delete_checkpoint(path))

    async def _delete_checkpoint(self, path: str) -> None:
        validation.parse_path(path)
        await self._wire.send("DELETE", "/v1/checkpoints", params={"path": path}, mutating=True)

    def list_sessions(self) -> list[TrainingInfo]:
        return self._loop.wait(self._list_sessions())

    async def list_sessions_async(self) -> list[TrainingInfo]:
        return await self._loop.run(self._list_sessions())

    async def _list_sessions(self) -> list[TrainingInfo]:
        return _SESSIONS.validate_json((await self._wire.send("GET", "/v1/sessions")).content)

    def checkpoint_info(self, path: str) -> WeightsInfo:
        return self._loop.wait(self._checkpoint_info(path))

    async def checkpoint_info_async(self, path: str) -> WeightsInfo:
        return await self._loop.run(self._checkpoint_info(path))

    async def _checkpoint_info(self, path: str) -> WeightsInfo:
        validation.parse_path(path)
        answer = await self._wire.send("GET", "/v1/checkpoints/info", params={"path": path})
        return WeightsInfo.model_validate_json(answer.content)

    def publish_checkpoint(self, path: str, public: bool) -> StateResult:
        return self._loop.wait(self._publish_checkpoint(path, public))

    async def publish_checkpoint_async(self, path: str, public: bool) -> StateResult:
        return await self._loop.run(self._publish_checkpoint(path, public))

    async def _publish_checkpoint(self, path: str, public: bool) -> StateResult:
        validation.parse_path(path)
        method = "POST" if public else "DELETE"
        answer = await self._wire.send(method, "/v1/checkpoints/publish", params={"path": path}, mutating=True)
        return StateResult.model_validate_json(answer.content)

    def set_checkpoint_ttl(self, path: str, ttl_seconds: float | None) -> StateResult:
        return self._loop.wait(self._set_checkpoint_ttl(path, ttl_seconds))

    async def set_checkpoint_ttl_async(self, path: str, ttl_seconds: float | None) -> StateResult:
        return await self._loop.run(self._set_checkpoint_ttl(path, ttl_seconds))

    async def _set_checkpoint_ttl(self, path: str, ttl_seconds: float | None) -> StateResult:
        validation.parse_path(path)
        body = wire.CheckpointTtl(path=path, ttl_seconds=validation.ttl_seconds(ttl_seconds))
        answer = await self._wire.send("PUT", "/v1/checkpoints/ttl", body=body, mutating=True)
        return StateResult.model_validate_json(answer.content)

    def external_weights_urls(self, path: str) -> ExternalWeightsUrls:
        return self._loop.wait(self._external_weights_urls(path))

    async def external_weights_urls_async(self, path: str) -> ExternalWeightsUrls:
        return await self._loop.run(self._external_weights_urls(path))

    async def _external_weights_urls(self, path: str) -> ExternalWeightsUrls:
        validation.parse_path(path)
        answer = await self._wire.send("GET", "/v1/checkpoints/external_weights_urls", params={"path": path})
        return ExternalWeightsUrls.model_validate_json(answer.content)

    # ---- helpers (coroutines on the transport's loop) --------------------------------------

    async def _ordered(
        self, session_id: str, seq: int, operation: str, body: Callable[[], BaseModel], decode: Decode
    ) -> Future:
        """Submit ordered work. When it is refused for good (by the checks here or by the server
        before the engine took it: size, auth, ownership), `seq` is released on the server, so
        the session's later requests still run; releasing a number the engine took is a no-op.
        A retryable refusal keeps `seq` for the retry (bios.retry)."""
        try:
            return await self._wire.submit(f"/v1/sessions/{session_id}/{operation}", body(), decode)
        except BiosError as exc:
            if not exc.retryable:
                try:
                    await self._skip(session_id, seq)
                except BiosError:
                    pass  # the server is unreachable or the session is not ours: nothing to release
            raise


def _sample_fields(prompt: object, params: object, num_samples: object) -> dict:
    return {
        "prompt": validation.instance(prompt, ModelInput, "prompt"),
        "sampling_params": validation.instance(params, SamplingParams, "sampling_params"),
        "num_samples": validation.sample_count(num_samples),
    }


def _text(value: object, field: str) -> str:
    """`value` when it is a string; InvalidRequestError naming `field` otherwise."""
    if isinstance(value, str):
        return value
    raise InvalidRequestError(f"{field} must be a string, got {type(value).__name__}", field=field)
