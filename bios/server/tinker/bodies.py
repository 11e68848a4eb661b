"""The JSON request bodies of the Tinker SDK that Bios reads, and their mapping to Bios types.

Only the fields Bios acts on are declared; unknown fields are ignored, as newer SDK releases
add some. A field whose value Bios cannot honour is refused by the route, never dropped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from bios.errors import UnsupportedError
from bios.types import LoraConfig, ModelInput, SamplingParams


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CreateSession(Body):
    user_metadata: dict[str, Any] | None = None
    display_name: str | None = None


class SessionRef(Body):
    session_id: str


class TinkerLora(Body):
    rank: int
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True

    def to_bios(self) -> LoraConfig:
        """The Bios adapter: same rank and layers; no seed means seed 0."""
        return LoraConfig(
            rank=self.rank,
            seed=self.seed or 0,
            train_attn=self.train_attn,
            train_mlp=self.train_mlp,
            train_unembed=self.train_unembed,
        )


class CreateModel(Body):
    session_id: str
    model_seq_id: int
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: TinkerLora | None = None
    optimizer_config: dict[str, Any] | None = None


class ModelRef(Body):
    model_id: str


class OptimStep(Body):
    model_id: str
    seq_id: int | None = None
    adam_params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeights(Body):
    model_id: str
    seq_id: int | None = None
    path: str | None = None
    overwrite: bool = False
    ttl_seconds: int | None = None
    user_metadata: dict[str, Any] | None = None


class SaveExternal(SaveWeights):
    age_encryption_recipients: list[str] | None = None


class CheckpointTtl(Body):
    ttl_seconds: int | None = None


class SaveForSampler(SaveWeights):
    sampling_session_seq_id: int | None = None


class LoadWeights(Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    weights_access_token: str | None = None


class CreateSampler(Body):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


class Sample(Body):
    prompt: dict[str, Any]
    sampling_params: dict[str, Any]
    num_samples: int = 1
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None


class Retrieve(Body):
    request_id: str


class WeightsInfo(Body):
    tinker_path: str


def model_input(prompt: dict[str, Any]) -> ModelInput:
    """A Tinker `ModelInput` (`{"chunks": [...]}`) of text chunks as a Bios one."""
    tokens: list[int] = []
    for i, chunk in enumerate(prompt.get("chunks") or []):
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            kind = chunk.get("type") if isinstance(chunk, dict) else type(chunk).__name__
            raise UnsupportedError(
                f"prompt.chunks[{i}]: {kind} chunks are not supported; send token ids", field=f"prompt.chunks[{i}]"
            )
        tokens.extend(chunk.get("tokens") or [])
    return ModelInput.from_ints(tokens)


def sampling_params(params: dict[str, Any]) -> SamplingParams:
    """Tinker sampling params as Bios ones, whose `stop` means the same (absent or None: stop
    at EOS; an empty list: at nothing); no `max_tokens`: until a stop or the context is full."""
    given = {k: params[k] for k in ("max_tokens", "seed", "temperature", "top_k", "top_p") if params.get(k) is not None}
    return SamplingParams(**given, stop=params.get("stop"))


def user_metadata(metadata: dict[str, Any] | None) -> dict[str, str]:
    """Tinker's string-valued user metadata (other values as their text)."""
    return {str(k): v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}
