"""The HTTP protocol between `bios.transport.http` and `bios serve`: paths, bodies, envelopes.

Bodies are JSON of the `bios.types` models. Work that runs on the engine (everything ordered by
a session's sequence number, and sampling) is answered at once with a `Submitted` request id;
its outcome is fetched with `GET /v1/requests/{id}?wait=SECONDS`, which answers 408 while the
work is still running and otherwise the stored envelope `{"status": "done", "result": ...}` or
`{"status": "error", "error": BiosError.to_dict()}`. Errors of synchronous calls are answered
with the error's HTTP status and the same `{"error": ...}` body. Every mutating request carries
an `Idempotency-Key` header: a retry with the same key and body gets the first answer, the same
key with a different body is a 409. A work request carrying `Bios-Stream-Answer: 1` is answered
with a stream of lines instead (`STREAM_ANSWER_HEADER`): the `Submitted` line at once, then the
envelope as soon as the work is done, so the answer costs no second request.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from bios.types import AdamParams, CheckpointKind, Datum, LoraConfig, ModelInput, SamplingParams

API_KEY_HEADER = "Authorization"
"""Carries `Bearer <api key>`."""
IDEMPOTENCY_HEADER = "Idempotency-Key"
ATTEMPT_HEADER = "Bios-Attempt"
"""Which try of a request this is (1, 2, ...); the server submits it as that attempt. A client's
retries of one request share its sequence number, and its idempotency key while the server may
hold the request (no answer came); once the server answered a try with a retryable failure,
the next try gets a new key (see `bios.retry`)."""
MAX_WAIT_S = 30.0
"""The longest a long-poll is held before the server answers 408 (not done yet)."""
STREAM_ANSWER_HEADER = "Bios-Stream-Answer"
"""Sent (`1`) with work: the answer is `STREAM_MEDIA_TYPE`, the `Submitted` JSON and a newline at
once, then the envelope and a newline when the work is done within `MAX_WAIT_S` — else the
stream ends after the first line and the client polls `GET /v1/requests/{id}` as usual."""
STREAM_MEDIA_TYPE = "application/x-ndjson"


class Body(BaseModel):
    """Base of the request bodies: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateSession(Body):
    base_model: str
    lora_config: LoraConfig
    user_metadata: dict[str, str] | None = None


class SessionFromState(Body):
    path: str
    base_model: str | None = None
    optimizer: bool = True
    """Restore the checkpoint's Adam moments and step too (False: its weights, at step 0)."""
    user_metadata: dict[str, str] | None = None


class Ordered(Body):
    """A request that runs at sequence number `seq` of its session."""

    seq: int


class ForwardBackward(Ordered):
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float] | None = None
    backward: bool = True


class OptimStep(Ordered):
    adam_params: AdamParams
    after_forward: bool = False
    """Run only if the request at seq - 1 succeeded (what `train` sends)."""


class SessionSample(Ordered):
    prompt: ModelInput
    sampling_params: SamplingParams
    num_samples: int = 1


class SaveState(Ordered):
    name: str
    metadata: dict[str, Any] | None = None
    kind: CheckpointKind = "state"
    ttl_seconds: float | None = None
    """The checkpoint is gone this long after the save (None: kept until deleted)."""
    merged: str | None = None
    """External weights only: also the merged model, in this dtype."""


class LoadState(Ordered):
    path: str
    optimizer: bool = True
    """Restore the checkpoint's Adam moments and step too (False: its weights, at step 0)."""


class CheckpointTtl(Body):
    path: str
    ttl_seconds: float | None = None
    """The checkpoint is gone this long from now (None: kept until deleted)."""


class CreateSampler(Body):
    model_path: str | None = None
    base_model: str | None = None


class SamplerSample(Body):
    prompt: ModelInput
    sampling_params: SamplingParams
    num_samples: int = 1
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


class SamplerLogprobs(Body):
    prompt: ModelInput


class Submitted(BaseModel):
    """The immediate answer to work that runs on the engine."""

    request_id: str


class Sampler(BaseModel):
    """A sampling client's handle on the server."""

    sampler_id: str
    base_model: str


class NextSeq(BaseModel):
    next_seq: int
