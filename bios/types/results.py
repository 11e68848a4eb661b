"""What Bios returns. Every result is frozen and ignores fields it does not know."""

from __future__ import annotations

import datetime
from typing import Literal

from pydantic import Field, JsonValue

from bios.types._base import ResultModel
from bios.types.params import LoraConfig
from bios.types.tensors import TensorData


class RequestTiming(ResultModel):
    """When the service queued, started and answered a request, in seconds on its clock (the
    simulated clock under the service simulator), and how many attempts the client made: a
    retried request was queued with its first attempt and started and answered with its last."""

    enqueued_at: float
    started_at: float
    finished_at: float
    attempts: int = 1


class ForwardBackwardResult(ResultModel):
    """Result of `forward` or `forward_backward` on a batch.

    `loss` is the sum over the batch of the loss's per-token terms (never a mean).
    `loss_fn_outputs[i]` holds datum i's per-token `logprobs` (log p of each target token under
    the current weights) and `elementwise_loss`, both aligned with its input.
    """

    loss: float
    loss_fn_output_type: str = "TensorData"
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    timing: RequestTiming | None = None


ForwardBackwardOutput = ForwardBackwardResult


class OptimStepResult(ResultModel):
    """Result of `optim_step`: the step number reached and `grad_norm` / `learning_rate`."""

    step: int
    metrics: dict[str, float] = Field(default_factory=dict)
    timing: RequestTiming | None = None


class TrainingResult(ResultModel):
    """Result of `train()`: forward_backward then optim_step as one call."""

    loss: float
    step: int
    metrics: dict[str, float] = Field(default_factory=dict)
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    timing: RequestTiming | None = None
    """The optim_step's timing (the forward_backward's comes first)."""


StopReason = Literal["stop", "length"]


class SampledSequence(ResultModel):
    """One completion. `logprobs[i]` is log p(tokens[i]) under the model's unmodified
    distribution (temperature 1, no top-k/top-p), so it equals what `forward` computes."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason
    sequence_id: str | None = None
    """The tinker SDK's id of a sampled sequence, which later requests may cite as provenance;
    Bios's samplers give none (None), and no Bios loss reads provenance."""


class SampleResult(ResultModel):
    """Completions of one prompt; `prompt_logprobs` when asked for (first entry None), and
    `topk_prompt_logprobs` when asked for: at each prompt position t >= 1, the k most likely
    `(token, logprob)` pairs after prompt[:t], most likely first (first entry None)."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_cache_hit_tokens: int = 0
    """Prompt tokens served from a prefix cache, as the tinker SDK reports them; Bios keeps no
    prefix cache, so always 0."""
    timing: RequestTiming | None = None


SampleResponse = SampleResult


CheckpointKind = Literal["state", "sampler", "external"]
"""A training state (weights + optimizer, for resuming), a sampler snapshot (weights, for
sampling) or external weights (weights as a Hugging Face PEFT adapter, for downloading)."""


class StateResult(ResultModel):
    """A saved checkpoint: its `bios://` path, id, name and the user's metadata."""

    path: str
    id: str
    name: str
    kind: CheckpointKind = "state"
    step: int = 0
    base_model: str = ""
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    created_at: float = 0.0
    """Unix time of the save, in seconds."""
    size_bytes: int | None = None
    """Bytes the checkpoint's files take on disk (every file of its directory); None where
    the checkpoint was not measured."""
    expires_at: float | None = None
    """Unix time from which the checkpoint is gone (saved with `ttl_seconds`); None: it stays
    until deleted."""
    public: bool = False
    """Published (`RestClient.publish_checkpoint_from_tinker_path`): on a server, any key may
    load it and sample from it."""


class ExternalWeightsUrls(ResultModel):
    """Where to download the files of an external weights checkpoint (`save_weights_external`):
    one URL per file, keyed by the file's path within the checkpoint (`adapter_config.json`,
    `adapter_model.safetensors`). A served URL is signed and needs no API key until `expires`;
    in-process the URLs are `file://` URLs that last as long as the checkpoint (`expires` None)."""

    urls: dict[str, str]
    expires: datetime.datetime | None = None


class ModelInfo(ResultModel):
    """Facts about one base model a deployment serves."""

    model_name: str
    architecture: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    max_seq_len: int
    n_params: int
    max_lora_rank: int
    random_init: bool
    """True when the weights are seed-generated stand-ins, not trained ones."""
    description: str = ""


class ServerCapabilities(ResultModel):
    """What a deployment offers."""

    supported_models: list[ModelInfo]
    backend: str = ""
    loss_fns: list[str] = Field(default_factory=list)
    simulated_time_scale: float | None = None
    """Set when the deployment runs under the service simulator: real seconds per simulated
    second (0: simulated time jumps). Its clients back off on simulated time too."""


class CheckpointList(ResultModel):
    """`RestClient.list_checkpoints` / `list_user_checkpoints`: checkpoints, oldest first."""

    checkpoints: list[StateResult] = Field(default_factory=list)


class TrainingRunList(ResultModel):
    """`RestClient.list_training_runs`: the caller's open training sessions, oldest first."""

    training_runs: list[TrainingInfo] = Field(default_factory=list)


class WeightsInfo(ResultModel):
    """`RestClient.get_weights_info_by_tinker_path`: what a checkpoint holds."""

    path: str
    kind: CheckpointKind
    base_model: str
    lora_config: LoraConfig
    step: int


class TrainingInfo(ResultModel):
    """`TrainingClient.get_info()`: the session's identity, model, adapter and step."""

    session_id: str
    base_model: str
    lora_config: LoraConfig
    step: int
    model_name: str = ""
    user_metadata: dict[str, str] = Field(default_factory=dict)
    """What the session was created with (`ServiceClient(user_metadata=)` and the create call's)."""
