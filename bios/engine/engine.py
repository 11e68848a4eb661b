"""The engine: sessions, their ordered requests, sampler snapshots and checkpoints.

It is everything that is not arithmetic. The in-process transport calls it directly and the
server calls the same methods, so both behave identically. Requests are validated completely
in the calling thread (raising `InvalidRequestError` / `NotFoundError` at once and changing
nothing); the work then runs on the scheduler's worker, and the returned
`concurrent.futures.Future` resolves with a public result type.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bios import validation
from bios.backend import (
    AdapterSpec,
    AdapterState,
    Backend,
    ForwardBackwardOutput,
    OptimStepOutput,
    SampleOutput,
    SimulatingBackend,
    Ticket,
)
from bios.catalog import Catalog, ModelSpec
from bios.clock import REAL_CLOCK, current_attempt
from bios.engine.checkpoints import CheckpointStore
from bios.engine.peft import is_local_directory, read_peft_adapter
from bios.engine.scheduler import Job, Scheduler
from bios.engine.snapshots import SnapshotPool
from bios.errors import BackendError, InvalidRequestError, NotFoundError
from bios.futures import TimedFuture
from bios.handles import SamplerHandle
from bios.losses import LOSSES
from bios.tokenizer import Tokenizer
from bios.types import (
    AdamParams,
    Datum,
    ForwardBackwardResult,
    LoraConfig,
    ModelInfo,
    ModelInput,
    OptimStepResult,
    SampledSequence,
    SampleResult,
    SamplingParams,
    ServerCapabilities,
    StateResult,
    TensorData,
    TrainingInfo,
)
from bios.validation import SCHEME, parse_path


@dataclass(slots=True)
class _Session:
    session_id: str
    model: ModelSpec
    adapter: AdapterSpec
    step: int = 0


class Engine:
    """Owns sessions, sampler snapshots and the checkpoint store on top of one backend.

    On a simulating backend (the service simulator) every queued request is first admitted by
    the backend with a `Ticket`, its future is a `TimedFuture` on the backend's clock, and —
    unless `inline` is False (a server, whose event loop must never run backend calls) or the
    backend is not deterministic — requests run inline in submission order.
    """

    def __init__(
        self, backend: Backend, catalog: Catalog, store: CheckpointStore, *, inline: bool | None = None
    ) -> None:
        self.backend = backend
        self.catalog = catalog
        self.store = store
        self.simulating = isinstance(backend, SimulatingBackend)
        self.clock = backend.clock if self.simulating else REAL_CLOCK  # type: ignore[attr-defined]
        deterministic = self.simulating and bool(backend.deterministic)  # type: ignore[attr-defined]
        self.scheduler = Scheduler(backend, inline=deterministic if inline is None else inline and deterministic)
        self._sessions: dict[str, _Session] = {}
        self._samplers: dict[str, SamplerHandle] = {}
        self.snapshots = SnapshotPool(backend, store)
        self._tokenizers: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()

    # ---- discovery -------------------------------------------------------------------------

    def capabilities(self) -> ServerCapabilities:
        models = [self.catalog.get(name) for name in self.catalog.names()]
        return ServerCapabilities(
            supported_models=[_model_info(spec) for spec in models],
            backend=self.backend.name,
            loss_fns=list(LOSSES),
            simulated_time_scale=self.clock.time_scale if self.simulating else None,  # type: ignore[attr-defined]
        )

    def tokenizer(self, base_model: str) -> Tokenizer:
        with self._lock:
            if base_model not in self._tokenizers:
                self._tokenizers[base_model] = self.catalog.get(base_model).tokenizer()
            return self._tokenizers[base_model]

    # ---- sessions --------------------------------------------------------------------------

    def create_session(self, base_model: str, lora: LoraConfig) -> TrainingInfo:
        """A new training session with a freshly initialised adapter."""
        validation.instance(lora, LoraConfig, "lora_config")
        model = self.catalog.get(base_model)
        session_id = f"session-{uuid.uuid4().hex[:12]}"
        adapter = validation.lora_adapter(session_id, model, lora)
        return self._open_session(_Session(session_id, model, adapter), state=None)

    def create_session_from_state(
        self, path: str | os.PathLike, base_model: str | None = None, *, optimizer: bool = True
    ) -> TrainingInfo:
        """A new session resuming the training state saved at `path` (a `bios://SESSION/weights/NAME`
        path: weights, optimizer moments and step; with `optimizer` False the weights only, at
        step 0 with zero moments), or starting from the Hugging Face PEFT LoRA adapter in local
        directory `path` (`adapter_config.json` + `adapter_model.safetensors`) on `base_model`,
        at step 0 with zero Adam moments. `base_model` is required for a PEFT directory; for a
        `bios://` path it may be given only as the checkpoint's own base model."""
        if is_local_directory(path):
            return self._session_from_peft(Path(path), base_model)
        if not isinstance(path, str) or not path.startswith(SCHEME):
            raise InvalidRequestError(
                f"path {str(path)!r} is neither a checkpoint path (bios://SESSION/weights/NAME) nor a local "
                "directory holding a PEFT LoRA adapter (adapter_config.json)",
                field="path",
            )
        record = _training_state(self.store.record(path))
        if base_model is not None and base_model != record.base_model:
            raise InvalidRequestError(
                f"base_model: {path} holds an adapter for {record.base_model}, not {base_model!r}", field="base_model"
            )
        session_id = f"session-{uuid.uuid4().hex[:12]}"
        state = _weights_only(self.store.load(path, session_id), optimizer)
        model = self.catalog.get(state.spec.base_model)
        return self._open_session(_Session(session_id, model, state.spec, state.step), state=state)

    def _session_from_peft(self, directory: Path, base_model: str | None) -> TrainingInfo:
        """A new session whose adapter starts from a PEFT LoRA adapter; validated fully first."""
        if base_model is None:
            raise InvalidRequestError(
                f"base_model: {directory} is a PEFT adapter, which does not name a Bios model; pass base_model=",
                field="base_model",
            )
        model = self.catalog.get(base_model)
        lora, weights = read_peft_adapter(directory, model)
        session_id = f"session-{uuid.uuid4().hex[:12]}"
        adapter = validation.lora_adapter(session_id, model, lora)
        state = AdapterState(spec=adapter, step=0, weights=weights)  # no moments: the backend starts them at zero
        return self._open_session(_Session(session_id, model, adapter, 0), state=state)

    def _open_session(self, session: _Session, state: AdapterState | None) -> TrainingInfo:
        self.scheduler.call(lambda: self.backend.create_adapter(session.adapter, state)).result()
        with self._lock:
            self._sessions[session.session_id] = session
        self.scheduler.open_lane(session.session_id)
        return self.session_info(session.session_id)

    def reopen_session(self, state: AdapterState, next_seq: int) -> TrainingInfo:
        """Serve again a session that existed before a restart: adapter `state` (whose
        `spec.adapter_id` is the session id), its requests numbered from `next_seq` on."""
        session_id = state.spec.adapter_id
        model = self.catalog.get(state.spec.base_model)
        self.scheduler.call(lambda: self.backend.create_adapter(state.spec, state)).result()
        with self._lock:
            self._sessions[session_id] = _Session(session_id, model, state.spec, state.step)
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

    def export_state(self, session_id: str) -> concurrent.futures.Future:
        """Future[AdapterState] of the session as of the requests queued so far (run outside its lane:
        call it only while none of its requests is queued, e.g. right after creating it)."""
        session = self._session(session_id)
        return self.scheduler.call(lambda: self.backend.export_state(session.adapter.adapter_id))

    def session_info(self, session_id: str) -> TrainingInfo:
        session = self._session(session_id)
        spec = session.adapter
        lora = LoraConfig(
            rank=spec.rank, alpha=spec.alpha, target_modules=spec.target_modules, dropout=spec.dropout, seed=spec.seed
        )
        return TrainingInfo(
            session_id=session_id,
            base_model=session.model.name,
            lora_config=lora,
            step=session.step,
            model_name=session.model.name,
        )

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

    def _ordered(self, session: _Session, seq: int, build: Callable[[], Job]) -> concurrent.futures.Future:
        """Validate with `build` and queue at `seq`; a rejected request still uses up `seq`."""
        try:
            job = self._admitted(build(), session.session_id, seq)
        except Exception:
            self.scheduler.skip(session.session_id, seq)
            raise
        return self.scheduler.submit(session.session_id, seq, job)

    def _admitted(self, job: Job, lane: str, seq: int | None) -> Job:
        """`job`, admitted by a simulating backend with its ticket (which may refuse it)."""
        if self.simulating and job.kind != "call":
            attempt = current_attempt()
            sent_at = self.clock.now() if attempt.sent_at is None else attempt.sent_at
            job.ticket = Ticket(lane=lane, seq=seq, kind=job.kind, enqueued_at=sent_at, attempt=attempt.number)
            self.backend.admit(job.work, job.ticket)  # type: ignore[attr-defined]
            job.future = TimedFuture(self.clock)
        return job

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
    ) -> concurrent.futures.Future:
        """Future[ForwardBackwardResult]; with backward, the gradient joins the accumulator."""
        session = self._session(session_id)

        def build() -> Job:
            work = validation.forward_work(
                session.adapter.adapter_id, session.model, data, loss_fn, loss_fn_config, backward=backward
            )
            return Job("forward_backward", session.model.name, work, _forward_result)

        return self._ordered(session, seq, build)

    def optim_step(
        self, session_id: str, seq: int, adam: AdamParams, *, export_state: bool = False
    ) -> concurrent.futures.Future:
        """Future[OptimStepResult]: Adam(W) on the accumulated gradient, which is then cleared.
        With `export_state`, Future[(OptimStepResult, AdapterState)]: the state right after the
        step, taken before any later request of the session runs."""
        session = self._session(session_id)

        def finish(output: OptimStepOutput) -> OptimStepResult | tuple[OptimStepResult, AdapterState]:
            session.step = output.step
            result = OptimStepResult(
                step=output.step, metrics={"grad_norm": output.grad_norm, "learning_rate": adam.learning_rate}
            )
            return (result, self.backend.export_state(session.adapter.adapter_id)) if export_state else result

        return self._ordered(
            session,
            seq,
            lambda: Job(
                "optim_step", session.model.name, validation.optim_work(session.adapter.adapter_id, adam), finish
            ),
        )

    def sample(
        self, session_id: str, seq: int, prompt: ModelInput, params: SamplingParams, num_samples: int = 1
    ) -> concurrent.futures.Future:
        """Future[SampleResult] from the session's current weights, in order with its training."""
        session = self._session(session_id)

        def build() -> Job:
            work = validation.sample_work(session.adapter.adapter_id, session.model, prompt, params, num_samples)
            return Job("sample", session.model.name, work, _sample_result)

        return self._ordered(session, seq, build)

    def save_state(
        self, session_id: str, seq: int, name: str, metadata: dict | None = None, kind: str = "state"
    ) -> concurrent.futures.Future:
        """Future[StateResult]: checkpoint the session (kind "state") or freeze a sampler snapshot ("sampler")."""
        session = self._session(session_id)

        def build() -> Job:
            checked_name, checked_meta = validation.checkpoint_name(name), validation.metadata(metadata)

            def save() -> StateResult:
                state = self.backend.export_state(session.adapter.adapter_id)
                record = self.store.save(state, session.session_id, kind, checked_name, checked_meta, session.model)
                if kind == "sampler":
                    self.snapshots.remember(record, state)
                return record

            return Job("call", session.model.name, save)

        return self._ordered(session, seq, build)

    def load_state(
        self, session_id: str, seq: int, path: str, *, export_state: bool = False, optimizer: bool = True
    ) -> concurrent.futures.Future:
        """Future[TrainingInfo]: replace the session's adapter, moments and step with `path`'s
        (with `optimizer` False: its weights, at step 0 with zero moments; with `export_state`,
        Future[(TrainingInfo, AdapterState)] as in `optim_step`)."""
        session = self._session(session_id)

        def build() -> Job:
            record = _training_state(self.store.record(path))
            if record.base_model != session.model.name:
                raise InvalidRequestError(
                    f"path {path} holds an adapter for {record.base_model}, "
                    f"but this session trains {session.model.name}",
                    field="path",
                )

            def load() -> TrainingInfo:
                state = _weights_only(self.store.load(path, session.adapter.adapter_id), optimizer)
                self.backend.delete_adapter(session.adapter.adapter_id)
                self.backend.create_adapter(state.spec, state)
                session.adapter, session.step = state.spec, state.step
                return (
                    (self.session_info(session.session_id), state)
                    if export_state
                    else self.session_info(session.session_id)
                )

            return Job("call", session.model.name, load)

        return self._ordered(session, seq, build)

    # ---- sampling clients -----------------------------------------------------------------

    def create_sampler(
        self, model_path: str | None = None, base_model: str | None = None, *, sampler_id: str | None = None
    ) -> SamplerHandle:
        """A sampling target for a saved checkpoint (`model_path`) or a bare `base_model`
        (named `sampler_id` when given, e.g. to serve a sampler again after a restart)."""
        if (model_path is None) == (base_model is None):
            raise InvalidRequestError("give exactly one of model_path and base_model", field="model_path")
        sampler_id = sampler_id or f"sampler-{uuid.uuid4().hex[:12]}"
        if base_model is not None:
            handle = SamplerHandle(sampler_id, self.catalog.get(base_model).name, None)
        else:
            record = self.store.record(model_path)  # type: ignore[arg-type]
            self.catalog.get(record.base_model)
            adapter_id = self.scheduler.call(lambda: self.snapshots.acquire(record)).result()
            handle = SamplerHandle(sampler_id, record.base_model, adapter_id, record.id)
        with self._lock:
            self._samplers[handle.sampler_id] = handle
        return handle

    def release_sampler(self, sampler_id: str) -> None:
        """Forget a sampling client; its snapshot adapter is freed when no other client uses it.
        Does not wait; unknown ids and a shut-down engine are ignored."""
        with self._lock:
            handle = self._samplers.pop(sampler_id, None)
        if handle is not None and handle.checkpoint_id is not None:
            try:
                self.scheduler.call(lambda: self.snapshots.release(handle.checkpoint_id))
            except BackendError:
                pass

    def sampler_sample(
        self,
        sampler_id: str,
        prompt: ModelInput,
        params: SamplingParams,
        num_samples: int = 1,
        *,
        prompt_logprobs: bool = False,
    ) -> concurrent.futures.Future:
        """Future[SampleResult] from a frozen snapshot or base model."""
        handle = self._sampler(sampler_id)
        work = validation.sample_work(
            handle.adapter_id,
            self.catalog.get(handle.base_model),
            prompt,
            params,
            num_samples,
            prompt_logprobs=prompt_logprobs,
        )
        return self.scheduler.submit(
            None, None, self._admitted(Job("sample", handle.base_model, work, _sample_result), sampler_id, None)
        )

    def sampler_logprobs(self, sampler_id: str, prompt: ModelInput) -> concurrent.futures.Future:
        """Future[list[float | None]]: log p(prompt[t] | prompt[:t]), None for t = 0."""
        handle = self._sampler(sampler_id)
        model = self.catalog.get(handle.base_model)
        validation.instance(prompt, ModelInput, "prompt")
        ids = validation.check_tokens(prompt.to_ints(), model, "prompt")
        if ids.size == 1:
            return _done([None])
        datum = Datum(model_input=ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]})
        work = validation.forward_work(handle.adapter_id, model, [datum], "cross_entropy", None, backward=False)

        def finish(output: ForwardBackwardOutput) -> list[float | None]:
            return [None, *(float(x) for x in output.logprobs[0])]

        return self.scheduler.submit(
            None, None, self._admitted(Job("forward_backward", model.name, work, finish), sampler_id, None)
        )

    def _sampler(self, sampler_id: str) -> SamplerHandle:
        try:
            return self._samplers[sampler_id]
        except KeyError:
            raise NotFoundError(f"sampler_id: no sampling client {sampler_id!r}", field="sampler_id") from None

    # ---- checkpoints ------------------------------------------------------------------------

    def list_checkpoints(self, session_id: str | None = None) -> list[StateResult]:
        return self.store.list(session_id)

    def delete_checkpoint(self, path: str) -> None:
        parse_path(path)
        self.store.delete(path)

    def simulation_report(self) -> object | None:
        """The simulator's report so far (a `bios.simulation.SimulationReport`; it also writes
        the trace file when the simulation names one), or None when not simulating."""
        return self.backend.report() if self.simulating else None  # type: ignore[attr-defined]

    def close(self) -> None:
        self.scheduler.close()
        self.backend.close()

    # ---- async twins (the Transport protocol) ------------------------------------------------
    # Calls that wait for the worker thread run on a thread of their own; the others only check
    # and queue, so they run on the caller's loop as they are.

    async def capabilities_async(self) -> ServerCapabilities:
        return self.capabilities()

    async def create_session_async(self, base_model: str, lora: LoraConfig) -> TrainingInfo:
        return await asyncio.to_thread(self.create_session, base_model, lora)

    async def create_session_from_state_async(
        self, path: str | os.PathLike, base_model: str | None = None
    ) -> TrainingInfo:
        return await asyncio.to_thread(self.create_session_from_state, path, base_model)

    async def session_info_async(self, session_id: str) -> TrainingInfo:
        return self.session_info(session_id)

    async def next_seq_async(self, session_id: str) -> int:
        return self.next_seq(session_id)

    async def skip_async(self, session_id: str, seq: int) -> None:
        self.skip(session_id, seq)

    async def forward_backward_async(
        self,
        session_id: str,
        seq: int,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
        *,
        backward: bool = True,
    ) -> concurrent.futures.Future:
        return self.forward_backward(session_id, seq, data, loss_fn, loss_fn_config, backward=backward)

    async def optim_step_async(self, session_id: str, seq: int, adam: AdamParams) -> concurrent.futures.Future:
        return self.optim_step(session_id, seq, adam)

    async def sample_async(
        self, session_id: str, seq: int, prompt: ModelInput, params: SamplingParams, num_samples: int = 1
    ) -> concurrent.futures.Future:
        return self.sample(session_id, seq, prompt, params, num_samples)

    async def save_state_async(
        self, session_id: str, seq: int, name: str, metadata: dict | None = None, kind: str = "state"
    ) -> concurrent.futures.Future:
        return self.save_state(session_id, seq, name, metadata, kind)

    async def load_state_async(self, session_id: str, seq: int, path: str) -> concurrent.futures.Future:
        return self.load_state(session_id, seq, path)

    async def create_sampler_async(self, model_path: str | None = None, base_model: str | None = None) -> SamplerHandle:
        return await asyncio.to_thread(self.create_sampler, model_path, base_model)

    async def sampler_sample_async(
        self,
        sampler_id: str,
        prompt: ModelInput,
        params: SamplingParams,
        num_samples: int = 1,
        *,
        prompt_logprobs: bool = False,
    ) -> concurrent.futures.Future:
        return self.sampler_sample(sampler_id, prompt, params, num_samples, prompt_logprobs=prompt_logprobs)

    async def sampler_logprobs_async(self, sampler_id: str, prompt: ModelInput) -> concurrent.futures.Future:
        return self.sampler_logprobs(sampler_id, prompt)


def _training_state(record: StateResult) -> StateResult:
    """`record` if it is a full training state; sampler snapshots lack the optimizer moments."""
    if record.kind != "state":
        raise InvalidRequestError(
            f"path {record.path} is a sampler snapshot (weights only); resume training from a "
            "save_state checkpoint (bios://SESSION/weights/NAME)",
            field="path",
        )
    return record


def _weights_only(state: AdapterState, optimizer: bool) -> AdapterState:
    """`state` itself, or (without `optimizer`) its weights at step 0 with no moments, which a
    backend starts at zero."""
    return state if optimizer else AdapterState(spec=state.spec, step=0, weights=state.weights)


def _done(value: object) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return future


def _model_info(spec: ModelSpec) -> ModelInfo:
    return ModelInfo(
        model_name=spec.name,
        architecture=spec.architecture,
        vocab_size=spec.vocab_size,
        d_model=spec.d_model,
        n_layers=spec.n_layers,
        n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads,
        max_seq_len=spec.max_seq_len,
        n_params=spec.n_params,
        max_lora_rank=spec.max_lora_rank,
        random_init=spec.random_init,
        description=spec.description,
    )


def _forward_result(output: ForwardBackwardOutput) -> ForwardBackwardResult:
    return ForwardBackwardResult(
        loss=float(output.loss),
        loss_fn_outputs=[
            {
                "logprobs": TensorData.from_numpy(np.asarray(lp, dtype=np.float32)),
                "elementwise_loss": TensorData.from_numpy(np.asarray(el, dtype=np.float32)),
            }
            for lp, el in zip(output.logprobs, output.elementwise_loss, strict=True)
        ],
        metrics={k: float(v) for k, v in output.metrics.items()},
    )


def _sample_result(output: SampleOutput) -> SampleResult:
    prompt_lp = None
    if output.prompt_logprobs is not None:
        prompt_lp = [None if i == 0 else float(x) for i, x in enumerate(output.prompt_logprobs)]
    return SampleResult(
        sequences=[
            SampledSequence(
                tokens=[int(t) for t in s.tokens], logprobs=[float(x) for x in s.logprobs], stop_reason=s.stop_reason
            )  # type: ignore[arg-type]
            for s in output.sequences
        ],
        prompt_logprobs=prompt_lp,
    )
