"""What a user configures: sampling, the optimizer and the LoRA adapter."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator

from bios.types._base import RequestModel

LoraModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES: tuple[str, ...] = (*ATTENTION_MODULES, *MLP_MODULES, "lm_head")
_SWITCHES = {"train_attn": ATTENTION_MODULES, "train_mlp": MLP_MODULES, "train_unembed": ("lm_head",)}
_BOOL = TypeAdapter(bool)


def _as_bool(value: object) -> bool:
    """`value` as pydantic reads a bool; False if it is not one (its field then reports the error)."""
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return False


class SamplingParams(RequestModel):
    """How to draw a completion."""

    max_tokens: int | None = Field(None, ge=1)
    """Tokens to generate per sample, at most; a stop sequence is included in the count. None
    (the default, as in the tinker SDK): until a stop, or until prompt and completion fill the
    model's context (`max_seq_len`)."""
    temperature: float = Field(1.0, ge=0.0)
    """Softmax temperature; 0 means greedy (argmax) decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus mass kept before sampling; 1.0 keeps the whole vocabulary."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 keeps all."""
    seed: int | None = Field(None, ge=0)
    """Seed of the sampler's random stream; None draws a fresh one."""
    stop: str | list[str] | list[int] | None = None
    """Stop strings or stop token ids; generation ends after the first match, which is kept.
    None (the default) stops at the model's end-of-sequence token, as in the tinker SDK; an
    empty list stops at nothing but `max_tokens`."""

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
    train_attn: bool | None = Field(None, validate_default=True)
    """Adapt q_proj, k_proj, v_proj, o_proj (default True)."""
    train_mlp: bool | None = Field(None, validate_default=True)
    """Adapt gate_proj, up_proj, down_proj (default True)."""
    train_unembed: bool | None = Field(None, validate_default=True)
    """Adapt lm_head (default False)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input during forward_backward; masks are drawn from `seed`."""
    seed: int = Field(0, ge=0)
    """Seed of the A initialisation and of dropout masks."""

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: object) -> object:
        # Only fills in what was left out; every check lives in a field validator so that its
        # error names the field (`LoraConfig.train_attn`, `LoraConfig.target_modules`, ...).
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("target_modules") is None:
            defaults = {"train_attn": True, "train_mlp": True, "train_unembed": False}
            on = {key: default if data.get(key) is None else _as_bool(data[key]) for key, default in defaults.items()}
            data["target_modules"] = tuple(m for key, modules in _SWITCHES.items() if on[key] for m in modules)
        if data.get("alpha") is None:
            try:
                data["alpha"] = 2.0 * float(data.get("rank", 32))
            except (TypeError, ValueError):
                pass  # an invalid rank is reported by its own field validation
        return data

    @field_validator("target_modules")
    @classmethod
    def _canonical_modules(cls, modules: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if modules is None:
            return None
        if not modules:
            raise ValueError(
                "name at least one module (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head), "
                "or leave at least one of train_attn, train_mlp, train_unembed True"
            )
        return tuple(m for m in ALL_MODULES if m in modules)

    @field_validator("train_attn", "train_mlp", "train_unembed")
    @classmethod
    def _switch_matches(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        modules = info.data.get("target_modules")
        if modules is None:
            return value  # target_modules itself is invalid and reported
        derived = all(m in modules for m in _SWITCHES[str(info.field_name)])
        if value is not None and value != derived:
            raise ValueError(
                f"{info.field_name}={value} contradicts target_modules {list(modules)}; "
                f"give target_modules or the train_* switches, not both"
            )
        return derived

    @property
    def scale(self) -> float:
        """The LoRA multiplier `alpha / rank`."""
        return float(self.alpha) / self.rank  # type: ignore[arg-type]
