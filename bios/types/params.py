"""What a user configures: sampling, the optimizer and the LoRA adapter."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from bios.types._base import RequestModel

LoraModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES: tuple[str, ...] = (*ATTENTION_MODULES, *MLP_MODULES, "lm_head")


class SamplingParams(RequestModel):
    """How to draw a completion."""

    max_tokens: int = Field(16, ge=1)
    """Tokens to generate per sample, at most; a stop sequence is included in the count."""
    temperature: float = Field(1.0, ge=0.0)
    """Softmax temperature; 0 means greedy (argmax) decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus mass kept before sampling; 1.0 keeps the whole vocabulary."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 keeps all."""
    seed: int | None = Field(None, ge=0)
    """Seed of the sampler's random stream; None draws a fresh one."""
    stop: str | list[str] | list[int] | None = None
    """Stop strings or stop token ids; generation ends after the first match, which is kept."""

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, top_k: int) -> int:
        if top_k != -1 and top_k < 1:
            raise ValueError("top_k must be -1 (no limit) or >= 1")
        return top_k

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, stop: str | list[str] | list[int] | None) -> str | list[str] | list[int] | None:
        items = [stop] if isinstance(stop, str) else (stop or [])
        if any(isinstance(s, str) and s == "" for s in items):
            raise ValueError("stop strings must be non-empty")
        if any(isinstance(s, int) and s < 0 for s in items):
            raise ValueError("stop token ids must be >= 0")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        """The stop sequences given as text."""
        if isinstance(self.stop, str):
            return (self.stop,)
        return tuple(s for s in self.stop or [] if isinstance(s, str))

    def stop_token_ids(self) -> tuple[int, ...]:
        """The stop sequences given as token ids."""
        if isinstance(self.stop, str):
            return ()
        return tuple(s for s in self.stop or [] if isinstance(s, int))


class AdamParams(RequestModel):
    """Adam(W) with bias correction, decoupled weight decay and global-norm clipping."""

    learning_rate: float = Field(1e-4, ge=0.0)
    """Step size."""
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """Decay of the first-moment estimate."""
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    """Decay of the second-moment estimate."""
    eps: float = Field(1e-12, gt=0.0)
    """Added to the root of the second moment."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Decoupled weight decay, multiplied by the learning rate (AdamW)."""
    grad_clip_norm: float = Field(0.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 disables clipping."""


class LoraConfig(RequestModel):
    """A LoRA adapter: which linear layers get one, its rank and its scale `alpha / rank`.

    Give either `target_modules` or the `train_*` switches. With neither, attention and MLP
    projections are trained and the unembedding is not.
    """

    rank: int = Field(32, ge=1, le=512)
    """Inner dimension R of every A [in, R] / B [R, out] pair."""
    alpha: float | None = Field(None, gt=0.0)
    """Scale numerator; the update is `(alpha / rank) * x @ A @ B`. None means `2 * rank`."""
    target_modules: tuple[LoraModule, ...] | None = None
    """Linear layers that get an adapter, by Hugging Face name."""
    train_attn: bool | None = None
    """Adapt q_proj, k_proj, v_proj, o_proj (default True)."""
    train_mlp: bool | None = None
    """Adapt gate_proj, up_proj, down_proj (default True)."""
    train_unembed: bool | None = None
    """Adapt lm_head (default False)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input during forward_backward; masks are drawn from `seed`."""
    seed: int = Field(0, ge=0)
    """Seed of the A initialisation and of dropout masks."""

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = {k: data[k] for k in ("train_attn", "train_mlp", "train_unembed") if data.get(k) is not None}
        if data.get("target_modules") is not None:
            modules = tuple(dict.fromkeys(data["target_modules"]))
            if not modules:
                raise ValueError("target_modules must name at least one module")
            data["target_modules"] = tuple(m for m in ALL_MODULES if m in modules) + tuple(
                m for m in modules if m not in ALL_MODULES
            )
        else:
            chosen = (ATTENTION_MODULES if given.get("train_attn", True) else ()) + (
                MLP_MODULES if given.get("train_mlp", True) else ()
            )
            chosen += ("lm_head",) if given.get("train_unembed", False) else ()
            if not chosen:
                raise ValueError("at least one of train_attn, train_mlp, train_unembed must be True")
            data["target_modules"] = chosen
        if data.get("alpha") is None:
            data["alpha"] = 2.0 * float(data.get("rank", 32))
        for key, modules in (("train_attn", ATTENTION_MODULES), ("train_mlp", MLP_MODULES), ("train_unembed", ("lm_head",))):
            derived = all(m in data["target_modules"] for m in modules)
            if key in given and given[key] != derived:
                raise ValueError(f"{key}={given[key]} contradicts target_modules {list(data['target_modules'])}")
            data[key] = derived
        return data

    @property
    def scale(self) -> float:
        """The LoRA multiplier `alpha / rank`."""
        return float(self.alpha) / self.rank  # type: ignore[arg-type]
