"""The engine: sessions, their ordered requests, sampler snapshots and checkpoints.

It is everything that is not arithmetic. The in-process transport calls it directly and the
server calls the same methods, so both behave identically. Requests are validated completely
in the calling thread (raising `InvalidRequestError` / `NotFoundError` at once and changing
nothing); the work then runs on the scheduler's worker, and the returned
`concurrent.futures.Future` resolves with a public result type.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from bios import validation
from bios.admission import DIRECT, RequestHook
from bios.backend import AdapterSpec, AdapterState, Backend, OptimStepOutput
from bios.catalog import Catalog, ModelSpec
from bios.clock import Clock
from bios.engine import results, resume
from bios.engine.checkpoints import CheckpointStore
from bios.engine.samplers import Samplers
from bios.engine.scheduler import Batched, Call, Job, Scheduler
from bios.engine.snapshots import SnapshotPool
from bios.engine.twins import queued_twin, waiting_twin
from bios.errors import BackendError, InvalidRequestError, NotFoundError
from bios.handles import SamplerHandle
from bios.losses import LOSSES
from bios.tokenizer import Tokenizer
from bios.types import (
    AdamParams,
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
from bios.validation import parse_path

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class WithState(Generic[R]):
    """A request's `result` with the adapter's `state` right after it (what a server journals)."""

    result: R
    state: AdapterState


@dataclass(slots=True)
class _Session:
    session_id: str
    model: ModelSpec
    adapter: AdapterSpec
    step: int = 0
    user_metadata: dict[str, str] = field(default_factory=dict)


class Engine:
    """Owns sessions, sampler snapshots and the checkpoint store on top of one backend.

    Every request passes `hook` (bios.admission) when it is queued and when it has run: a
    layer around the engine, such as the service simulator, acts there; the engine's clock is
    the hook's. `allow_inline` False (a server, whose event loop must never run backend calls)
    keeps a worker thread even when the hook asks for inline runs.
    """

    def __init__(
        self,
        backend: Backend,
        catalog: Catalog,
        store: CheckpointStore,
        *,
        hook: RequestHook = DIRECT,
        allow_inline: bool = True,
    ) -> None:
        self.backend = backend
        self.catalog = catalog
        self.store = store
        self.clock: Clock = hook.clock
        self.scheduler = Scheduler(backend, hook, inline=hook.inline and allow_inline)
        self._sessions: dict[str, _Session] = {}
        self.snapshots = SnapshotPool(backend, store)
        self.samplers = Samplers(catalog, store, self.snapshots, self.scheduler)
        self._tokenizers: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()

    # ---- discovery -------------------------------------------------------------------------

    def capabilities(self) -> ServerCapabilities:
        models = [self.catalog.get(name) for name in self.catalog.names()]
        return ServerCapabilities(
            supported_models=[results.model_info(spec) for spec in models],
            backend=self.backend.name,
            loss_fns=list(LOSSES),
            simulated_time_scale=self.clock.time_scale,
        )

    def tokenizer(self, base_model: str) -> Tokenizer:
        with self._lock:
            if base_model not in self._tokenizers:
                self._tokenizers[base_model] = self.catalog.get(base_model).tokenizer()
            return self._tokenizers[base_model]

    # ---- sessions --------------------------------------------------------------------------

    def create_session(
        self, base_model: str, lora: LoraConfig, user_metadata: dict[str, str] | None = None
    ) -> TrainingInfo:
        """A new training session with a freshly initialised adapter."""
        lora = validation.instance(lora, LoraConfig, "lora_config")
        meta = validation.user_metadata(user_metadata)
        model = self.catalog.get(base_model)
        session_id = f"session-{uuid.uuid4().hex[:12]}"
        adapter = validation.lora_adapter(session_id, model, lora)
        return self._open_session(_Session(session_id, model, adapter, user_metadata=meta), state=None)

    def create_session_from_state(
        self,
        path: str | os.PathLike[str],
        base_model: str | None = None,
        *,
        optimizer: bool = True,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingInfo:
        """A new session starting from `path`: a `bios://SESSION/weights/NAME` training state
        (weights, optimizer moments and step; with `optimizer` False the weights only, at step 0
        with zero moments), or a local Hugging Face PEFT LoRA adapter directory on `base_model`
        (at step 0 with zero moments). See `bios.engine.resume.starting_state`."""
        meta = validation.user_metadata(user_metadata)
        session_id = f"session-{uuid.uuid4().hex[:12]}"
        state = resume.starting_state(self.store, self.catalog, path, base_model, session_id, optimizer=optimizer)
        model = self.catalog.get(state.spec.base_model)
        return self._open_session(_Session(session_id, model, state.spec, state.step, meta), state=state)

    def _open_session(self, session: _Session, state: AdapterState | None) -> TrainingInfo:
        self.scheduler.call(lambda: self.backend.create_adapter(session.adapter, state)).result()
        with self._lock:
            self._sessions[session.session_id] = session
        self.scheduler.open_lane(session.session_id)
        return self.session_info(session.session_id)

    def reopen_session(
        self, state: AdapterState, next_seq: int, user_metadata: dict[str, str] | None = None
    ) -> TrainingInfo:
        """Serve again a session that existed before a restart: adapter `state` (whose
        `spec.adapter_id` is the session id), its requests numbered from `next_seq` on."""
        session_id = state.spec.adapter_id
        model = self.catalog.get(state.spec.base_model)
        self.scheduler.call(lambda: self.backend.create_adapter(state.spec, state)).result()
        with self._lock:
            self._sessions[session_id] = _Session(session_id, model, state.spec, state.step, dict(user_metadata or {}))
        self.scheduler.open_lane(session_id, next_seq)
        return self.session_info(session_id)

    def close_session(self, session_id: str) -> None:
        """End a session: its adapter is freed once the requests already running are done.
        Does not wait; unknown sessions and a shut-down engine are ignored."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            return
        self.scheduler.close_lane(session_id)
        try:
            self.scheduler.call(lambda: self.backend.delete_adapter(session.adapter.adapter_id))
        except BackendError:
            pass

    def export_state(self, session_id: str) -> Future[AdapterState]:
        """Future[AdapterState] of the session as of the requests queued so far (run outside its lane:
        call it only while none of its requests is queued, e.g. right after creating it)."""
        session = self._session(session_id)
        return self.scheduler.call(lambda: self.backend.export_state(session.adapter.adapter_id))

    def session_info(self, session_id: str) -> TrainingInfo:
        session = self._session(session_id)
        return TrainingInfo(
            session_id=session_id,
            base_model=session.model.name,
            lora_config=_lora_config(session.adapter),
            step=session.step,
            model_name=session.model.name,
            user_metadata=dict(session.user_metadata),
        )

    def session_ids(self) -> list[str]:
        """The sessions open now."""
        with self._lock:
            return sorted(self._sessions)

    def list_sessions(self) -> list[TrainingInfo]:
        """The sessions open now, oldest first (in-process, every one is the caller's)."""
        with self._lock:
            opened = list(self._sessions)  # a dict keeps the order in which sessions were opened
        return [self.session_info(session_id) for session_id in opened]

    def next_seq(self, session_id: str) -> int:
        return self.scheduler.next_seq(self._session(session_id).session_id)

    def skip(self, session_id: str, seq: int) -> None:
        """Release sequence number `seq` unused (e.g. a custom loss whose function raised)."""
        self.scheduler.skip(self._session(session_id).session_id, seq)

    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise NotFoundError(f"session_id: no training session {session_id!r}", field="session_id") from None

    def _ordered(self, session: _Session, seq: int, build: Callable[[], Job[R]]) -> Future[R]:
        """Validate with `build` and queue at `seq`; a rejected request still uses up `seq`."""
        try:
            return self.scheduler.submit(session.session_id, seq, build())
        except Exception:
            self.scheduler.skip(session.session_id, seq)
            raise

    # ---- training --------------------------------------------------------------------------

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
        """Loss and logprobs of `data`; with backward, the gradient joins the accumulator. With
        `step_follows`, the caller queues an optim_step at `seq + 1` right away (or skips that
        number), and the two may run as one fused step."""
        session = self._session(session_id)

        def build() -> Job[ForwardBackwardResult]:
            work = validation.forward_work(
                session.adapter.adapter_id, session.model, data, loss_fn, loss_fn_config, backward=backward
            )
            batched = Batched("forward_backward", session.model.name, work)
            return Job(batched, results.forward_result, step_follows=step_follows)

        return self._ordered(session, seq, build)

    def optim_step(
        self, session_id: str, seq: int, adam: AdamParams, *, after_forward: bool = False
    ) -> Future[OptimStepResult]:
        """Adam(W) on the accumulated gradient, which is then cleared. With `after_forward`, only
        if the request at `seq - 1` succeeded (else a ConflictError saying so, and nothing changes)."""
        return self._optim_step(session_id, seq, adam, lambda session, result: result, after_forward)

    def optim_step_and_export(
        self, session_id: str, seq: int, adam: AdamParams, *, after_forward: bool = False
    ) -> Future[WithState[OptimStepResult]]:
        """`optim_step`, with the adapter's state right after the step, taken before any later
        request of the session runs."""
        return self._optim_step(session_id, seq, adam, self._with_state, after_forward)

    def _optim_step(
        self,
        session_id: str,
        seq: int,
        adam: AdamParams,
        answer: Callable[[_Session, OptimStepResult], R],
        after_forward: bool,
    ) -> Future[R]:
        session = self._session(session_id)

        def finish(output: OptimStepOutput) -> R:
            session.step = output.step
            metrics = {"grad_norm": output.grad_norm, "learning_rate": adam.learning_rate}
            return answer(session, OptimStepResult(step=output.step, metrics=metrics))

        def build() -> Job[R]:
            work = validation.optim_work(session.adapter.adapter_id, adam)
            return Job(Batched("optim_step", session.model.name, work), finish, after_success=after_forward)

        return self._ordered(session, seq, build)

    def sample(
        self, session_id: str, seq: int, prompt: ModelInput, params: SamplingParams, num_samples: int = 1
    ) -> Future[SampleResult]:
        """Completions from the session's current weights, in order with its training."""
        session = self._session(session_id)

        def build() -> Job[SampleResult]:
            work = validation.sample_work(session.adapter.adapter_id, session.model, prompt, params, num_samples)
            return Job(Batched("sample", session.model.name, work), results.sample_result)

        return self._ordered(session, seq, build)

    # ---- checkpoints of a session ------------------------------------------------------------

    def save_state(
        self,
        session_id: str,
        seq: int,
        name: str,
        metadata: dict[str, Any] | None = None,
        kind: str = "state",
        ttl_seconds: float | None = None,
        merged: str | None = None,
    ) -> Future[StateResult]:
        """Checkpoint the session (kind "state"), freeze a sampler snapshot ("sampler") or save
        its weights to download ("external", as a PEFT adapter, and with `merged` a dtype the
        merged model too); with `ttl_seconds`, the checkpoint is gone that long after the save
        (`CheckpointStore.save`)."""
        session = self._session(session_id)

        def build() -> Job[StateResult]:
            checked_name, checked_meta = validation.checkpoint_name(name), validation.metadata(metadata)
            ttl, dtype = validation.ttl_seconds(ttl_seconds), validation.merged_dtype(merged, kind)
            model = session.model

            def save() -> StateResult:
                state = self.backend.export_state(session.adapter.adapter_id)
                record = self.store.save(
                    state, session.session_id, kind, checked_name, checked_meta, model, ttl, merged=dtype
                )
                if kind == "sampler":
                    self.snapshots.remember(record, state)
                return record

            return Job(Call(save))

        return self._ordered(session, seq, build)

    def load_state(self, session_id: str, seq: int, path: str, *, optimizer: bool = True) -> Future[TrainingInfo]:
        """Replace the session's adapter, moments and step with `path`'s (with `optimizer` False:
        its weights, at step 0 with zero moments)."""
        return self._load_state(session_id, seq, path, optimizer, lambda state, info: info)

    def load_state_and_export(
        self, session_id: str, seq: int, path: str, *, optimizer: bool = True
    ) -> Future[WithState[TrainingInfo]]:
        """`load_state`, with the adapter's state right after it."""
        return self._load_state(session_id, seq, path, optimizer, lambda state, info: WithState(info, state))

    def _load_state(
        self, session_id: str, seq: int, path: str, optimizer: bool, answer: Callable[[AdapterState, TrainingInfo], R]
    ) -> Future[R]:
        session = self._session(session_id)

        def build() -> Job[R]:
            record = resume.training_state(self.store.record(path))
            if record.base_model != session.model.name:
                raise InvalidRequestError(
                    f"path {path} holds an adapter for {record.base_model}, "
                    f"but this session trains {session.model.name}",
                    field="path",
                )

            def load() -> R:
                state = resume.weights_only(self.store.load(path, session.adapter.adapter_id), optimizer)
                self.backend.delete_adapter(session.adapter.adapter_id)
                self.backend.create_adapter(state.spec, state)
                session.adapter, session.step = state.spec, state.step
                return answer(state, self.session_info(session.session_id))

            return Job(Call(load))

        return self._ordered(session, seq, build)

    def _with_state(self, session: _Session, result: OptimStepResult) -> WithState[OptimStepResult]:
        """`result` with the session's adapter state as of now (on the worker, between requests)."""
        return WithState(result, self.backend.export_state(session.adapter.adapter_id))

    # ---- sampling clients -----------------------------------------------------------------

    def create_sampler(
        self, model_path: str | None = None, base_model: str | None = None, *, sampler_id: str | None = None
    ) -> SamplerHandle:
        """A sampling target for a saved checkpoint (`model_path`) or a bare `base_model`
        (named `sampler_id` when given, e.g. to serve a sampler again after a restart)."""
        return self.samplers.create(model_path, base_model, sampler_id=sampler_id)

    def release_sampler(self, sampler_id: str) -> None:
        """Forget a sampling client (see `Samplers.release`)."""
        self.samplers.release(sampler_id)

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
        """Completions from a frozen snapshot or base model."""
        return self.samplers.sample(
            sampler_id,
            prompt,
            params,
            num_samples,
            prompt_logprobs=prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
        )

    def sampler_logprobs(self, sampler_id: str, prompt: ModelInput) -> Future[list[float | None]]:
        """log p(prompt[t] | prompt[:t]), None for t = 0."""
        return self.samplers.logprobs(sampler_id, prompt)

    # ---- checkpoints ------------------------------------------------------------------------

    def list_checkpoints(self, session_id: str | None = None) -> list[StateResult]:
        return self.store.list(session_id)

    def delete_checkpoint(self, path: str) -> None:
        parse_path(path)
        self.store.delete(path)

    def set_checkpoint_ttl(self, path: str, ttl_seconds: float | None) -> StateResult:
        parse_path(path)
        return self.store.set_ttl(path, validation.ttl_seconds(ttl_seconds))

    def publish_checkpoint(self, path: str, public: bool) -> StateResult:
        """Mark checkpoint `path` published (or not); in-process every checkpoint is the caller's
        anyway, a server lets any key read a published one."""
        parse_path(path)
        return self.store.set_public(path, bool(public))

    def checkpoint_info(self, path: str) -> WeightsInfo:
        """What checkpoint `path` holds: its kind, base model, LoRA configuration and step."""
        parse_path(path)
        record = self.store.record(path)
        spec = self.store.load(path, "inspected").spec
        return WeightsInfo(
            path=path, kind=record.kind, base_model=record.base_model, lora_config=_lora_config(spec), step=record.step
        )

    def external_weights_urls(self, path: str) -> ExternalWeightsUrls:
        """`file://` URLs of the files of external weights checkpoint `path`."""
        parse_path(path)
        return ExternalWeightsUrls(urls={name: file.as_uri() for name, file in self.store.external_files(path).items()})

    def close(self) -> None:
        self.scheduler.close()
        self.backend.close()

    # ---- async twins (the Transport protocol) ------------------------------------------------

    capabilities_async = queued_twin(capabilities)
    create_session_async = waiting_twin(create_session)
    create_session_from_state_async = waiting_twin(create_session_from_state)
    session_info_async = queued_twin(session_info)
    list_checkpoints_async = waiting_twin(list_checkpoints)
    delete_checkpoint_async = waiting_twin(delete_checkpoint)
    list_sessions_async = waiting_twin(list_sessions)
    publish_checkpoint_async = waiting_twin(publish_checkpoint)
    checkpoint_info_async = waiting_twin(checkpoint_info)
    set_checkpoint_ttl_async = waiting_twin(set_checkpoint_ttl)
    external_weights_urls_async = waiting_twin(external_weights_urls)
    next_seq_async = queued_twin(next_seq)
    skip_async = queued_twin(skip)
    forward_backward_async = queued_twin(forward_backward)
    optim_step_async = queued_twin(optim_step)
    sample_async = queued_twin(sample)
    save_state_async = queued_twin(save_state)
    load_state_async = queued_twin(load_state)
    create_sampler_async = waiting_twin(create_sampler)
    sampler_sample_async = queued_twin(sampler_sample)
    sampler_logprobs_async = queued_twin(sampler_logprobs)


def _lora_config(spec: AdapterSpec) -> LoraConfig:
    """The LoRA configuration an adapter was created with."""
    return LoraConfig(
        rank=spec.rank, alpha=spec.alpha, target_modules=spec.target_modules, dropout=spec.dropout, seed=spec.seed
    )
