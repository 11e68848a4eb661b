"""`Transport`: what the clients need from the service, whichever way it is reached.

Two classes satisfy it structurally: `bios.engine.Engine` (in this process) and
`bios.transport.http.HttpTransport` (a `bios serve` over HTTP). The clients hold a `Transport`
and never ask which one it is.

Shared promises of every method:
- Arguments are checked before anything changes; a bad one raises `InvalidRequestError` naming
  the field (the same error in-process and remote), an unknown id `NotFoundError`.
- Work methods (`forward_backward`, `optim_step`, `sample`, `save_state`, `load_state`,
  `sampler_sample`, `sampler_logprobs`) queue the request and return a
  `concurrent.futures.Future` of its result; an ordered request runs at sequence number `seq`
  of its session. A request refused for good before the engine took it releases `seq` (the
  session's later requests still run); after a retryable refusal `seq` stays open for the
  retry, and `bios.retry` releases it if it gives up.
- Each `*_async` twin does what its method does, awaited: it never blocks the caller's event
  loop on the network (in-process, a call that waits for the engine's worker runs on a thread).
- Failures that may pass are retryable `BiosError`s (`APIConnectionError`, `RateLimitError`,
  `ServiceUnavailableError`, ...). A transport never retries: `bios.retry` does, once.

Imports the contract layer only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

from bios.clock import Clock
from bios.handles import SamplerHandle
from bios.tokenizer import Tokenizer
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


class Transport(Protocol):
    """The service as the clients see it (see the module docstring for the shared promises)."""

    @property
    def clock(self) -> Clock:
        """What retries back off on and request timings are measured on: real time, or the
        service simulator's time."""
        ...

    # ---- discovery ------------------------------------------------------------------------

    def capabilities(self) -> ServerCapabilities:
        """The models served, with their architecture facts, the backend and the losses."""
        ...

    async def capabilities_async(self) -> ServerCapabilities:
        """`capabilities`, awaited without blocking the caller's event loop (so are all twins)."""
        ...

    def tokenizer(self, base_model: str) -> Tokenizer:
        """The tokenizer of `base_model` (NotFoundError if it is not served)."""
        ...

    # ---- sessions ---------------------------------------------------------------------------

    def create_session(
        self, base_model: str, lora: LoraConfig, user_metadata: dict[str, str] | None = None
    ) -> TrainingInfo:
        """A new training session on `base_model` with a freshly initialised adapter, carrying
        `user_metadata` (strings to strings) in its `TrainingInfo`."""
        ...

    async def create_session_async(
        self, base_model: str, lora: LoraConfig, user_metadata: dict[str, str] | None = None
    ) -> TrainingInfo: ...

    def create_session_from_state(
        self,
        path: str | os.PathLike,
        base_model: str | None = None,
        *,
        optimizer: bool = True,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingInfo:
        """A new session resuming the checkpoint at `path` (or, in-process, a PEFT directory):
        its weights, and with `optimizer` its Adam moments and step (else step 0, zero moments)."""
        ...

    async def create_session_from_state_async(
        self,
        path: str | os.PathLike,
        base_model: str | None = None,
        *,
        optimizer: bool = True,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingInfo: ...

    def session_info(self, session_id: str) -> TrainingInfo:
        """The session's base model, LoRA config and step."""
        ...

    async def session_info_async(self, session_id: str) -> TrainingInfo: ...

    def list_checkpoints(self, session_id: str | None = None) -> list[StateResult]:
        """The caller's checkpoints (of one session, if given), oldest first."""
        ...

    async def list_checkpoints_async(self, session_id: str | None = None) -> list[StateResult]: ...

    def delete_checkpoint(self, path: str) -> None:
        """Remove the caller's checkpoint at `path`; NotFoundError if there is none."""
        ...

    async def delete_checkpoint_async(self, path: str) -> None: ...

    def list_sessions(self) -> list[TrainingInfo]:
        """The caller's open training sessions, oldest first."""
        ...

    async def list_sessions_async(self) -> list[TrainingInfo]: ...

    def checkpoint_info(self, path: str) -> WeightsInfo:
        """What the checkpoint at `path` holds (the caller's, or a published one)."""
        ...

    async def checkpoint_info_async(self, path: str) -> WeightsInfo: ...

    def publish_checkpoint(self, path: str, public: bool) -> StateResult:
        """Publish the caller's checkpoint at `path` (on a server any key may then read it) or,
        with `public` False, unpublish it; its record."""
        ...

    async def publish_checkpoint_async(self, path: str, public: bool) -> StateResult: ...

    def set_checkpoint_ttl(self, path: str, ttl_seconds: float | None) -> StateResult:
        """Make the caller's checkpoint at `path` expire `ttl_seconds` from now (None: never);
        its record. NotFoundError if there is none."""
        ...

    async def set_checkpoint_ttl_async(self, path: str, ttl_seconds: float | None) -> StateResult: ...

    def external_weights_urls(self, path: str) -> ExternalWeightsUrls:
        """Download URLs of the files of the caller's external weights checkpoint `path`."""
        ...

    async def external_weights_urls_async(self, path: str) -> ExternalWeightsUrls: ...

    def close_session(self, session_id: str) -> None:
        """End the session once its running requests are done. Never blocks and never raises
        (it runs from finalizers): an unknown session or an unreachable service is ignored."""
        ...

    def next_seq(self, session_id: str) -> int:
        """The lowest sequence number of the session not yet submitted or released."""
        ...

    async def next_seq_async(self, session_id: str) -> int: ...

    def skip(self, session_id: str, seq: int) -> None:
        """Release `seq` unused, so the session's later requests may run (no-op once it ran)."""
        ...

    async def skip_async(self, session_id: str, seq: int) -> None: ...

    # ---- work on a session (ordered by `seq`) -------------------------------------------

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
        """Loss and logprobs; with `backward`, the gradient joins the session's accumulator.
        `step_follows` promises an optim_step at `seq + 1` sent right after (or that number
        skipped): a transport that can then fuses the two (a hint; others ignore it)."""
        ...

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
    ) -> Future[ForwardBackwardResult]: ...

    def optim_step(
        self, session_id: str, seq: int, adam: AdamParams, *, after_forward: bool = False
    ) -> Future[OptimStepResult]:
        """Adam(W) on the accumulated gradient, which is then cleared. With `after_forward`, only
        if the request at `seq - 1` (a forward_backward) succeeded; otherwise the future fails
        with a ConflictError and nothing changes. A forward_backward and an optim_step queued
        together may run as one fused step."""
        ...

    async def optim_step_async(
        self, session_id: str, seq: int, adam: AdamParams, *, after_forward: bool = False
    ) -> Future[OptimStepResult]: ...

    def sample(
        self, session_id: str, seq: int, prompt: ModelInput, params: SamplingParams, num_samples: int = 1
    ) -> Future[SampleResult]:
        """Completions from the session's current weights."""
        ...

    async def sample_async(
        self, session_id: str, seq: int, prompt: ModelInput, params: SamplingParams, num_samples: int = 1
    ) -> Future[SampleResult]: ...

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
        """A training checkpoint (kind "state"), a sampler snapshot ("sampler") or external
        weights ("external": a PEFT adapter, and with `merged` a dtype, the merged model too)
        of the session, gone `ttl_seconds` after the save if that is given."""
        ...

    async def save_state_async(
        self,
        session_id: str,
        seq: int,
        name: str,
        metadata: dict | None = None,
        kind: CheckpointKind = "state",
        ttl_seconds: float | None = None,
        merged: str | None = None,
    ) -> Future[StateResult]: ...

    def load_state(self, session_id: str, seq: int, path: str, *, optimizer: bool = True) -> Future[TrainingInfo]:
        """The session's adapter replaced by `path`'s, and with `optimizer` its moments and step
        too (else step 0 and zero moments)."""
        ...

    async def load_state_async(
        self, session_id: str, seq: int, path: str, *, optimizer: bool = True
    ) -> Future[TrainingInfo]: ...

    # ---- sampling clients -----------------------------------------------------------------

    def create_sampler(self, model_path: str | None = None, base_model: str | None = None) -> SamplerHandle:
        """A sampling target: the snapshot or checkpoint at `model_path`, or a bare `base_model`."""
        ...

    async def create_sampler_async(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> SamplerHandle: ...

    def release_sampler(self, sampler_id: str) -> None:
        """Forget a sampling target. Never blocks and never raises, like `close_session`."""
        ...

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
        """Completions from the sampling target (unordered); with `prompt_logprobs` its
        prompt's logprobs, with `topk_prompt_logprobs` k > 0 the k most likely tokens at each
        prompt position."""
        ...

    async def sampler_sample_async(
        self,
        sampler_id: str,
        prompt: ModelInput,
        params: SamplingParams,
        num_samples: int = 1,
        *,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Future[SampleResult]: ...

    def sampler_logprobs(self, sampler_id: str, prompt: ModelInput) -> Future[list[float | None]]:
        """log p(prompt[t] | prompt[:t]), None for t = 0."""
        ...

    async def sampler_logprobs_async(self, sampler_id: str, prompt: ModelInput) -> Future[list[float | None]]: ...

    def close(self) -> None:
        """Let go of what the transport holds (its owner calls it, once)."""
        ...
