"""The Backend protocol: the one seam between the engine and compute.

Small, synchronous and batched. The engine validates every request fully before a backend
sees it (token ids in range, loss inputs present and aligned, configs resolved), then hands
the backend *lists* of work items, possibly for many adapters on one base model, and gets one
result per item — a value or a `BiosError` for that item alone. A backend must leave an
adapter untouched when its item fails.

Backends are found by name through the `bios.backends` entry-point group, or as a
`module:factory` string; the factory takes a `BackendConfig` and returns a `Backend`.
Contract layer: imports numpy and `bios.catalog`/`bios.errors`/`bios.types` only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from bios.catalog import Catalog
from bios.errors import BiosError
from bios.types import StopReason


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """What a backend factory receives. Backends never read the environment."""

    catalog: Catalog
    options: dict[str, str] = field(default_factory=dict)
    """Backend-specific settings (e.g. `dtype`), passed through verbatim."""


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """One LoRA adapter on one base model. `scale` = alpha / rank."""

    adapter_id: str
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, slots=True)
class AdapterState:
    """Everything needed to resume an adapter: weights, Adam moments and the step.

    Arrays are in the backend's own precision (float64 in the emulator, float32 in JAX) so a
    save/load round trip is exact, keyed like `bios.weights.lora_shapes` (`A: [in, R]`,
    `B: [R, out]`); `adam_m`/`adam_v` have the same keys, or are empty for weights-only states.
    """

    spec: AdapterSpec
    step: int
    weights: dict[str, np.ndarray]
    adam_m: dict[str, np.ndarray] = field(default_factory=dict)
    adam_v: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ForwardBackwardWork:
    """Forward (and, if `backward`, gradient accumulation) for one request of one adapter.

    tokens[i]: [T_i] int64 input of datum i; inputs[i][name]: [T_i] per-token loss inputs
    (all of the loss's inputs present, optional ones filled). `adapter_id` None means the
    bare base model (forward only).
    """

    adapter_id: str | None
    base_model: str
    loss_fn: str
    loss_config: dict[str, float]
    tokens: tuple[np.ndarray, ...]
    inputs: tuple[dict[str, np.ndarray], ...]
    backward: bool


@dataclass(frozen=True, slots=True)
class ForwardBackwardOutput:
    """loss: the sum of every datum's elementwise loss. logprobs[i], elementwise_loss[i]: [T_i]."""

    loss: float
    logprobs: tuple[np.ndarray, ...]
    elementwise_loss: tuple[np.ndarray, ...]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OptimStepWork:
    """Apply and clear the adapter's accumulated gradient with Adam(W)."""

    adapter_id: str
    learning_rate: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip_norm: float


@dataclass(frozen=True, slots=True)
class OptimStepOutput:
    """step: the adapter's step count after this update; grad_norm: global norm before clipping."""

    step: int
    grad_norm: float


@dataclass(frozen=True, slots=True)
class SampleWork:
    """Draw `num_samples` completions of `prompt` ([T] int64).

    `adapter_id` None samples the bare base model. `stop_token_ids` end a sequence when
    generated; `stop_strings` when the decoded completion first contains one (checked after
    every token). temperature 0 is greedy; top_k -1 keeps all; seed None draws fresh entropy.
    """

    adapter_id: str | None
    base_model: str
    prompt: np.ndarray
    num_samples: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop_token_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    """k > 0: also the k most likely tokens at each prompt position (`SampleOutput.topk_prompt`)."""


@dataclass(frozen=True, slots=True)
class SampledOutput:
    """One completion: tokens [N], logprobs [N] (model distribution at temperature 1)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    stop_reason: StopReason


@dataclass(frozen=True, slots=True)
class SampleOutput:
    sequences: tuple[SampledOutput, ...]
    prompt_logprobs: np.ndarray | None = None
    """[T] log p(prompt[t] | prompt[:t]); entry 0 is NaN (nothing predicts the first token)."""
    topk_prompt: tuple[np.ndarray, np.ndarray] | None = None
    """With `topk_prompt_logprobs` k: (token ids [T-1, k] int64, their logprobs [T-1, k]
    float32), row t-1 the k most likely tokens after prompt[:t], most likely first."""


ResultCallback = Callable[[int, object], None]
"""`(index of the item in the work list, its output or BiosError)`."""


@runtime_checkable
class Backend(Protocol):
    """Compute for the engine. Methods are called from one engine thread at a time.

    Each batched method may call `on_result(index, output)` for an item as soon as its result
    is on the host, so that its request is answered before the rest of the batch; every item
    is also in the returned list. A backend may also set `checkpoint_format` ("safetensors", the
    default, or "orbax") to choose how the engine writes its checkpoints' tensors; every format loads on every backend.
    """

    name: str

    def create_adapter(self, spec: AdapterSpec, state: AdapterState | None = None) -> None:
        """Create `spec.adapter_id`, freshly initialised from `spec.seed` or from `state`."""
        ...

    def delete_adapter(self, adapter_id: str) -> None:
        """Free an adapter and its optimizer state and gradients. Unknown ids are ignored."""
        ...

    def export_state(self, adapter_id: str) -> AdapterState:
        """A copy of the adapter's weights, Adam moments and step (not its pending gradient)."""
        ...

    def forward_backward(
        self, work: Sequence[ForwardBackwardWork], on_result: ResultCallback | None = None
    ) -> list[ForwardBackwardOutput | BiosError]:
        """Losses and logprobs of every item, and gradients accumulated for those with `backward`."""
        ...

    def optim_step(
        self, work: Sequence[OptimStepWork], on_result: ResultCallback | None = None
    ) -> list[OptimStepOutput | BiosError]: ...

    def sample(
        self, work: Sequence[SampleWork], on_result: ResultCallback | None = None
    ) -> list[SampleOutput | BiosError]:
        """Completions of every item (continuously batched where the backend can)."""
        ...

    def close(self) -> None:
        """Release devices and memory."""
        ...


TrainStepOutput = tuple[ForwardBackwardOutput | BiosError, OptimStepOutput | BiosError | None]
"""A fused step's (forward_backward output, optim_step output); the step is None when it did not
run because its forward_backward failed."""


@runtime_checkable
class FusedTraining(Protocol):
    """A backend that may run a forward_backward and the optim_step right after it on the same
    adapter as one step (the scheduler hands it such pairs when both are queued)."""

    def train_step(self, work: Sequence[tuple[ForwardBackwardWork, OptimStepWork]]) -> list[TrainStepOutput]:
        """For every pair (distinct adapters, one base model): its forward_backward, then, only if
        that succeeded, its optim_step; outputs as the two methods would give them in turn."""
        ...


@runtime_checkable
class ProcessGroup(Protocol):
    """A backend that spans several processes (one per host) running the same programs in lockstep.

    Exactly one process leads: the engine and the server run there and call the Backend methods;
    every other process calls `follow`, which runs the calls the leader makes until it closes.
    """

    def leads(self) -> bool:
        """Whether this process takes the engine's calls."""
        ...

    def follow(self) -> None:
        """Run the leader's calls on this process until the leader closes; RuntimeError on the leader."""
        ...
