"""`TrainingClient`: one LoRA fine-tuning session.

Work methods return a `BiosFuture` at once and run in submission order on the service;
`forward_backward` calls accumulate gradients until `optim_step` applies and clears them, so
submitting both before waiting pipelines them. Each has an `*_async` twin directly below it:
awaiting the twin of a future-returning method gives the future (as in Tinker), awaiting the
twin of a blocking method (`train`, `load_state`, ...) gives the result. The twins never block
the caller's event loop on the network.
"""

from __future__ import annotations

import concurrent.futures
import threading
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Concatenate, ParamSpec

from bios import custom_loss, training_step
from bios.clock import Clock
from bios.errors import BiosError, InvalidRequestError
from bios.futures import BiosFuture, ReadyClient, TimedFuture, pinned, unsettled
from bios.retry import call_with_retries, call_with_retries_async, retrying, retrying_async
from bios.tokenizer import Tokenizer
from bios.transport import Transport
from bios.types import (
    AdamParams,
    CheckpointKind,
    Datum,
    ForwardBackwardResult,
    ModelInput,
    OptimStepResult,
    SampleResult,
    SamplingParams,
    StateResult,
    TrainingInfo,
    TrainingResult,
)

if TYPE_CHECKING:
    from bios.sampling_client import SamplingClient

P = ParamSpec("P")
Future = concurrent.futures.Future


class TrainingClient(ReadyClient):
    """A training session on the service. Create it with `ServiceClient.create_lora_training_client`."""

    def __init__(
        self, transport: Transport, info: TrainingInfo, next_seq: int, custom_losses: concurrent.futures.Executor
    ) -> None:
        """A client of session `info`, whose next request gets sequence number `next_seq`;
        custom losses are evaluated on `custom_losses` (its ServiceClient's workers)."""
        self._transport = transport
        self._custom_losses = custom_losses
        self.session_id = info.session_id
        self.base_model = info.base_model
        self._seq = next_seq
        self._seq_lock = threading.Lock()
        # When this client is garbage (and its requests are done), the service ends its session.
        weakref.finalize(self, transport.close_session, info.session_id)

    # ---- forward / backward -----------------------------------------------------------------

    def forward(
        self, data: Sequence[Datum], loss_fn: str = "cross_entropy", loss_fn_config: dict[str, float] | None = None
    ) -> BiosFuture[ForwardBackwardResult]:
        """Loss and per-token logprobs under the current weights; accumulates no gradient."""
        seq, t = self._reserve(), self._transport
        future = self._send(seq, "forward", t.forward_backward, data, loss_fn, loss_fn_config, backward=False)
        return BiosFuture(pinned(future, self), "forward")

    async def forward_async(
        self, data: Sequence[Datum], loss_fn: str = "cross_entropy", loss_fn_config: dict[str, float] | None = None
    ) -> BiosFuture[ForwardBackwardResult]:
        seq, t = self._reserve(), self._transport
        future = await self._send_async(
            seq, "forward", t.forward_backward, t.forward_backward_async, data, loss_fn, loss_fn_config, backward=False
        )
        return BiosFuture(pinned(future, self), "forward")

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str | custom_loss.CustomLossFn = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> BiosFuture[ForwardBackwardResult]:
        """Loss, per-token logprobs, and the gradient added to the session's accumulator.

        `loss_fn` is a built-in loss name (docs/losses.md); the loss is a plain sum over tokens.
        A callable runs as `forward_backward_custom`.
        """
        return self._forward_backward(data, loss_fn, loss_fn_config, step_follows=False)

    def _forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str | custom_loss.CustomLossFn,
        loss_fn_config: dict[str, float] | None,
        step_follows: bool,
    ) -> BiosFuture[ForwardBackwardResult]:
        """`forward_backward`; `step_follows`: an optim_step is sent right after it (`train`)."""
        if callable(loss_fn):
            return self.forward_backward_custom(data, loss_fn)
        seq, t = self._reserve(), self._transport
        future = self._send(
            seq, "forward_backward", t.forward_backward, data, loss_fn, loss_fn_config, step_follows=step_follows
        )
        return BiosFuture(pinned(future, self), "forward_backward")

    async def forward_backward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str | custom_loss.CustomLossFn = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> BiosFuture[ForwardBackwardResult]:
        return await self._forward_backward_async(data, loss_fn, loss_fn_config, step_follows=False)

    async def _forward_backward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str | custom_loss.CustomLossFn,
        loss_fn_config: dict[str, float] | None,
        step_follows: bool,
    ) -> BiosFuture[ForwardBackwardResult]:
        if callable(loss_fn):
            return await self.forward_backward_custom_async(data, loss_fn)
        seq, t = self._reserve(), self._transport
        call, call_async = t.forward_backward, t.forward_backward_async
        future = await self._send_async(
            seq, "forward_backward", call, call_async, data, loss_fn, loss_fn_config, step_follows=step_follows
        )
        return BiosFuture(pinned(future, self), "forward_backward")

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: custom_loss.CustomLossFn
    ) -> BiosFuture[ForwardBackwardResult]:
        """forward_backward with `loss_fn(data, logprobs) -> (loss, metrics)` written in jax.numpy.

        `logprobs[i]` is datum i's [T_i] logprobs of its `target_tokens`. The gradient is exact
        (docs/losses.md, L7); it costs one extra forward pass. The returned `loss`/`metrics` are
        the function's, `loss_fn_outputs` the logprobs.
        """
        items, reduced = _custom_inputs(data, loss_fn)
        seq, t = self._reserve(2), self._transport
        try:
            forward = self._send(seq, "forward_backward_custom", t.forward_backward, reduced, backward=False)
        except Exception:
            self._release(seq + 1)
            raise
        return self._custom_backward(forward, seq + 1, items, reduced, loss_fn)

    async def forward_backward_custom_async(
        self, data: Sequence[Datum], loss_fn: custom_loss.CustomLossFn
    ) -> BiosFuture[ForwardBackwardResult]:
        items, reduced = _custom_inputs(data, loss_fn)
        seq, t = self._reserve(2), self._transport
        try:
            forward = await self._send_async(
                seq, "forward_backward_custom", t.forward_backward, t.forward_backward_async, reduced, backward=False
            )
        except Exception:
            await self._release_async(seq + 1)
            raise
        return self._custom_backward(forward, seq + 1, items, reduced, loss_fn)

    def _custom_backward(
        self, forward: Future, seq: int, data: list[Datum], reduced: list[Datum], loss_fn: custom_loss.CustomLossFn
    ) -> BiosFuture[ForwardBackwardResult]:
        """Once `forward` (the logprobs of `reduced`) is done: evaluate `loss_fn` and its gradient
        on the custom-loss pool and send the surrogate backward pass at `seq`."""
        outer: Future = Future()

        def backward(done: Future) -> None:
            try:
                result: ForwardBackwardResult = done.result()
                logprobs = [out["logprobs"].to_numpy() for out in result.loss_fn_outputs]
                loss, metrics, grads = custom_loss.evaluate(loss_fn, data, logprobs)
                surrogate = custom_loss.surrogate_data(reduced, grads)
                self._send(seq, "forward_backward_custom", self._transport.forward_backward, surrogate).result()
                outer.set_result(
                    ForwardBackwardResult(
                        loss=loss, loss_fn_outputs=result.loss_fn_outputs, metrics={**metrics, "loss:sum": loss}
                    )
                )
            except BaseException as exc:  # noqa: BLE001 - every failure belongs to the caller's future
                self._release(seq)
                outer.set_exception(exc)

        def hand_over(done: Future) -> None:
            try:
                self._custom_losses.submit(backward, done)
            except RuntimeError:  # the workers are shut down: the ServiceClient was closed
                self._release(seq)
                outer.set_exception(BiosError("forward_backward_custom: the ServiceClient was closed"))

        forward.add_done_callback(hand_over)
        return BiosFuture(pinned(outer, self), "forward_backward_custom")

    # ---- optimizer ----------------------------------------------------------------------------

    def optim_step(self, adam_params: AdamParams | None = None) -> BiosFuture[OptimStepResult]:
        """Apply the accumulated gradient with Adam(W) (docs/losses.md O1–O5) and clear it."""
        seq, t = self._reserve(), self._transport
        future = self._send(seq, "optim_step", t.optim_step, AdamParams() if adam_params is None else adam_params)
        return BiosFuture(pinned(future, self), "optim_step")

    async def optim_step_async(self, adam_params: AdamParams | None = None) -> BiosFuture[OptimStepResult]:
        seq, t = self._reserve(), self._transport
        adam = AdamParams() if adam_params is None else adam_params
        future = await self._send_async(seq, "optim_step", t.optim_step, t.optim_step_async, adam)
        return BiosFuture(pinned(future, self), "optim_step")

    def train(
        self,
        data: Sequence[Datum],
        loss_fn: str | custom_loss.CustomLossFn = "cross_entropy",
        learning_rate: float = 1e-4,
        **kwargs: object,
    ) -> TrainingResult:
        """One training step: forward_backward then optim_step, as one call; blocks for the result.

        kwargs: `weight_decay`, `grad_clip` (alias `grad_clip_norm`), `beta1`, `beta2`, `eps`,
        and `loss_fn_config` for built-in losses. Everything is validated before anything runs,
        and the optimizer step is skipped if the forward_backward fails.
        """
        adam, config = training_step.settings(loss_fn, learning_rate, kwargs)
        forward = self._forward_backward(data, loss_fn, config, step_follows=True)
        t = self._transport
        step = self._send(self._reserve(), "optim_step", t.optim_step, adam, after_forward=True)
        return self._trained(forward, step).result()

    async def train_async(
        self,
        data: Sequence[Datum],
        loss_fn: str | custom_loss.CustomLossFn = "cross_entropy",
        learning_rate: float = 1e-4,
        **kwargs: object,
    ) -> TrainingResult:
        adam, config = training_step.settings(loss_fn, learning_rate, kwargs)
        forward = await self._forward_backward_async(data, loss_fn, config, step_follows=True)
        t = self._transport
        step = await self._send_async(
            self._reserve(), "optim_step", t.optim_step, t.optim_step_async, adam, after_forward=True
        )
        return await self._trained(forward, step)

    def _trained(
        self, forward: BiosFuture[ForwardBackwardResult], step: Future[OptimStepResult]
    ) -> BiosFuture[TrainingResult]:
        """The TrainingResult of `forward` and of `step`, the optim_step queued right after it
        with `after_forward` (so it runs only if `forward` succeeded, and the engine may fuse the
        two): `forward`'s error if it failed, else `step`'s outcome."""
        outer = TimedFuture(self._transport.clock)

        def after_forward(done: Future) -> None:
            step.add_done_callback(lambda opt: finish(done, opt))

        def finish(done: Future, opt: Future) -> None:
            error = done.exception()
            if error is not None:
                outer.set_exception(error)
            else:
                training_step.combine(outer, done.result(), opt)

        unsettled(forward).add_done_callback(after_forward)  # the user has not waited: the clock stays
        return BiosFuture(pinned(outer, self), "train")

    # ---- sampling -----------------------------------------------------------------------------

    def sample(
        self, prompt: ModelInput, sampling_params: SamplingParams, num_samples: int = 1
    ) -> BiosFuture[SampleResult]:
        """Completions from the session's current weights, in order with its training calls."""
        seq, t = self._reserve(), self._transport
        future = self._send(seq, "sample", t.sample, prompt, sampling_params, num_samples)
        return BiosFuture(pinned(future, self), "sample")

    async def sample_async(
        self, prompt: ModelInput, sampling_params: SamplingParams, num_samples: int = 1
    ) -> SampleResult:
        seq, t = self._reserve(), self._transport
        future = await self._send_async(seq, "sample", t.sample, t.sample_async, prompt, sampling_params, num_samples)
        return await BiosFuture(pinned(future, self), "sample")

    # ---- state --------------------------------------------------------------------------------

    def save_state(
        self,
        name: str,
        metadata: dict | None = None,
        *,
        ttl_seconds: float | None = None,
        user_metadata: dict | None = None,
    ) -> BiosFuture[StateResult]:
        """Checkpoint weights, optimizer state and step as `bios://SESSION/weights/NAME`. With
        `ttl_seconds` the checkpoint is gone that long after the save (its `expires_at`).
        `user_metadata` is the tinker SDK's name for `metadata`."""
        return self._save("save_state", "state", name, _one_metadata(metadata, user_metadata), ttl_seconds)

    async def save_state_async(
        self,
        name: str,
        metadata: dict | None = None,
        *,
        ttl_seconds: float | None = None,
        user_metadata: dict | None = None,
    ) -> BiosFuture[StateResult]:
        meta = _one_metadata(metadata, user_metadata)
        return await self._save_async("save_state", "state", name, meta, ttl_seconds)

    def load_state(self, path: str) -> TrainingClient:
        """Load the weights saved at `path` into this session with a fresh optimizer (step 0,
        zero Adam moments), as the tinker SDK's `load_state` does; `load_state_with_optimizer`
        restores the moments and step too. Pending gradients are discarded; the checkpoint must
        be of the same base model. Returns this client (a finished future of itself)."""
        return self._load(path, optimizer=False)

    async def load_state_async(self, path: str) -> TrainingClient:
        return await self._load_async(path, optimizer=False)

    def load_state_with_optimizer(self, path: str) -> TrainingClient:
        """Restore weights, Adam moments and step from `path` into this session (see `load_state`)."""
        return self._load(path, optimizer=True)

    async def load_state_with_optimizer_async(self, path: str) -> TrainingClient:
        return await self._load_async(path, optimizer=True)

    def _load(self, path: str, *, optimizer: bool) -> TrainingClient:
        seq = self._reserve()
        future = self._send(seq, "load_state", self._transport.load_state, path, optimizer=optimizer)
        BiosFuture(pinned(future, self), "load_state").result()
        return self

    async def _load_async(self, path: str, *, optimizer: bool) -> TrainingClient:
        seq, t = self._reserve(), self._transport
        future = await self._send_async(seq, "load_state", t.load_state, t.load_state_async, path, optimizer=optimizer)
        await BiosFuture(pinned(future, self), "load_state")
        return self

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: float | None = None, user_metadata: dict | None = None
    ) -> BiosFuture[StateResult]:
        """Freeze the current weights as `bios://SESSION/sampler_weights/NAME`; later training
        never changes it (`ttl_seconds`, `user_metadata`: as for `save_state`)."""
        return self._save("save_weights_for_sampler", "sampler", name, user_metadata, ttl_seconds)

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: float | None = None, user_metadata: dict | None = None
    ) -> BiosFuture[StateResult]:
        return await self._save_async("save_weights_for_sampler", "sampler", name, user_metadata, ttl_seconds)

    def save_weights_external(
        self, name: str, ttl_seconds: float | None = None, *, merged: str | None = None
    ) -> BiosFuture[StateResult]:
        """Save the current weights to download, as `bios://SESSION/external_weights/NAME`: a
        Hugging Face PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`)
        and, with `merged` ("float32" or "bfloat16"), the base model with the adapter merged in
        under `merged/` (config.json, model.safetensors, tokenizer files), whose file URLs
        `RestClient.get_external_weights_urls` gives (`ttl_seconds`: as for `save_state`)."""
        return self._save("save_weights_external", "external", name, None, ttl_seconds, merged)

    async def save_weights_external_async(
        self, name: str, ttl_seconds: float | None = None, *, merged: str | None = None
    ) -> BiosFuture[StateResult]:
        return await self._save_async("save_weights_external", "external", name, None, ttl_seconds, merged)

    def _save(
        self,
        label: str,
        kind: CheckpointKind,
        name: str,
        meta: dict | None,
        ttl_seconds: float | None,
        merged: str | None = None,
    ) -> BiosFuture[StateResult]:
        seq, t = self._reserve(), self._transport
        future = self._send(seq, label, t.save_state, name, meta, kind, ttl_seconds=ttl_seconds, merged=merged)
        return BiosFuture(pinned(future, self), label)

    async def _save_async(
        self,
        label: str,
        kind: CheckpointKind,
        name: str,
        meta: dict | None,
        ttl_seconds: float | None,
        merged: str | None = None,
    ) -> BiosFuture[StateResult]:
        seq, t = self._reserve(), self._transport
        future = await self._send_async(
            seq, label, t.save_state, t.save_state_async, name, meta, kind, ttl_seconds=ttl_seconds, merged=merged
        )
        return BiosFuture(pinned(future, self), label)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """Freeze the current weights and return a SamplingClient on them. Without `name`, the
        snapshot is named `sampler-<12 hex digits>`, unique to this call."""
        from bios.sampling_client import SamplingClient

        path = self.save_weights_for_sampler(name or _fresh_sampler_name()).result().path
        handle = call_with_retries(
            lambda: self._transport.create_sampler(model_path=path), "create_sampling_client", self._clock
        )
        return SamplingClient(self._transport, handle)

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None) -> SamplingClient:
        from bios.sampling_client import SamplingClient

        path = (await (await self.save_weights_for_sampler_async(name or _fresh_sampler_name()))).path
        handle = await call_with_retries_async(
            lambda: self._transport.create_sampler_async(model_path=path), "create_sampling_client", self._clock
        )
        return SamplingClient(self._transport, handle)

    # ---- facts --------------------------------------------------------------------------------

    def get_tokenizer(self) -> Tokenizer:
        """The base model's tokenizer."""
        return call_with_retries(lambda: self._transport.tokenizer(self.base_model), "get_tokenizer", self._clock)

    def get_info(self) -> TrainingInfo:
        """Session id, base model, LoRA config and the step reached by completed optim_steps."""
        return call_with_retries(lambda: self._transport.session_info(self.session_id), "get_info", self._clock)

    async def get_info_async(self) -> TrainingInfo:
        return await call_with_retries_async(
            lambda: self._transport.session_info_async(self.session_id), "get_info", self._clock
        )

    def __repr__(self) -> str:
        return f"TrainingClient(session_id={self.session_id!r}, base_model={self.base_model!r})"

    # ---- sending ------------------------------------------------------------------------------

    def _clock(self) -> Clock:
        return self._transport.clock

    def _reserve(self, count: int = 1) -> int:
        """The first of `count` consecutive sequence numbers, taken for this client's next requests."""
        with self._seq_lock:
            first, self._seq = self._seq, self._seq + count
            return first

    def _send(
        self, seq: int, label: str, call: Callable[Concatenate[str, int, P], Future], *args: P.args, **kwargs: P.kwargs
    ) -> Future:
        """The request `call(session_id, seq, *args, **kwargs)`, retried per the retry contract
        (bios.retry); a request that keeps failing releases `seq` so later requests can run."""
        return retrying(
            lambda: call(self.session_id, seq, *args, **kwargs),
            self._transport.clock,
            label,
            give_up=lambda: self._release(seq),
        )

    async def _send_async(
        self,
        seq: int,
        label: str,
        call: Callable[Concatenate[str, int, P], Future],
        call_async: Callable[Concatenate[str, int, P], Awaitable[Future]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Future:
        """`_send`, awaiting `call_async` (the same request, as a coroutine) to submit it."""
        return await retrying_async(
            lambda: call_async(self.session_id, seq, *args, **kwargs),
            lambda: call(self.session_id, seq, *args, **kwargs),
            self._transport.clock,
            label,
            give_up=lambda: self._release(seq),
        )

    def _release(self, seq: int) -> None:
        """Release `seq` unused, so the session's later requests may run (best effort: a session
        that is gone, or a service that stays unreachable, has nothing left to release)."""
        try:
            call_with_retries(lambda: self._transport.skip(self.session_id, seq), "skip", self._clock)
        except BiosError:
            pass

    async def _release_async(self, seq: int) -> None:
        try:
            await call_with_retries_async(lambda: self._transport.skip_async(self.session_id, seq), "skip", self._clock)
        except BiosError:
            pass


def _custom_inputs(data: Sequence[Datum], loss_fn: object) -> tuple[list[Datum], list[Datum]]:
    """(the data, the data reduced to what its logprobs need); InvalidRequestError naming the
    field when `loss_fn` is not callable or a datum lacks `target_tokens`."""
    if not callable(loss_fn):
        raise InvalidRequestError(f"loss_fn must be callable, got {type(loss_fn).__name__}", field="loss_fn")
    items = list(data) if isinstance(data, (list, tuple)) else data
    reduced = custom_loss.logprob_data(items)
    return list(items), reduced


def _fresh_sampler_name() -> str:
    """A name for a sampler snapshot the caller did not name."""
    return f"sampler-{uuid.uuid4().hex[:12]}"


def _one_metadata(metadata: dict | None, user_metadata: dict | None) -> dict | None:
    """The checkpoint metadata given under either name (InvalidRequestError if under both)."""
    if metadata is not None and user_metadata is not None:
        raise InvalidRequestError(
            "user_metadata: pass metadata or user_metadata (the tinker SDK's name for it), not both",
            field="user_metadata",
        )
    return metadata if metadata is not None else user_metadata
