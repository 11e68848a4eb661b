"""Loss specifications: names, inputs and configuration of the built-in losses — no arithmetic.

Each backend implements the formulas of `docs/losses.md`; this module only says what a loss
needs, so that the engine can validate a request fully before any backend sees it.
Contract layer: imports only `bios.errors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bios.errors import InvalidRequestError, UnsupportedError


@dataclass(frozen=True, slots=True)
class LossSpec:
    """What one built-in loss reads.

    required: `loss_fn_inputs` keys every datum must carry (per-token, aligned with the input).
    optional: keys that may be omitted, with the value each token then gets.
    config: `loss_fn_config` keys and their defaults.
    """

    name: str
    required: tuple[str, ...]
    optional: dict[str, float] = field(default_factory=dict)
    config: dict[str, float] = field(default_factory=dict)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.required + tuple(self.optional)

    def resolve_config(self, given: dict[str, float] | None) -> dict[str, float]:
        """Defaults overlaid with `given`, checked.

        Raises InvalidRequestError (field `loss_fn_config.KEY`) for an unknown key, a non-finite
        value, clip thresholds outside 0 <= low <= 1 <= high, or a negative beta.
        """
        resolved = dict(self.config)
        for key, value in (given or {}).items():
            where = f"loss_fn_config.{key}"
            if key not in self.config:
                allowed = ", ".join(self.config) or "none"
                raise InvalidRequestError(
                    f"{where} is not a setting of loss '{self.name}' (allowed: {allowed})", field=where
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequestError(f"{where} must be a finite number, got {value!r}", field=where)
            resolved[key] = float(value)
        low, high = resolved.get("clip_low_threshold"), resolved.get("clip_high_threshold")
        if low is not None and high is not None and not (0.0 <= low <= 1.0 <= high):
            raise InvalidRequestError(
                f"loss_fn_config: need 0 <= clip_low_threshold <= 1 <= clip_high_threshold, got {low} and {high}",
                field="loss_fn_config." + ("clip_low_threshold" if not 0.0 <= low <= 1.0 else "clip_high_threshold"),
            )
        if resolved.get("beta", 0.0) < 0:
            raise InvalidRequestError(
                f"loss_fn_config.beta must be >= 0, got {resolved['beta']}", field="loss_fn_config.beta"
            )
        return resolved


_POLICY_INPUTS = ("target_tokens", "logprobs", "advantages")
_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cross_entropy", ("target_tokens",), optional={"weights": 1.0}),
        LossSpec("importance_sampling", _POLICY_INPUTS),
        LossSpec("ppo", _POLICY_INPUTS, config=dict(_CLIP)),
        LossSpec("cispo", _POLICY_INPUTS, config=dict(_CLIP)),
        LossSpec("dro", _POLICY_INPUTS, config={"beta": 0.05}),
        LossSpec("gspo", (*_POLICY_INPUTS, "sequence_ratio_mask"), config=dict(_CLIP)),
    )
}
"""Every built-in loss, by name. Formulas: docs/losses.md."""

INTEGER_INPUTS = frozenset({"target_tokens"})
"""Inputs holding token ids; every other input is a float per token."""


UNPUBLISHED = {
    "stable_reinforce": "its objective, computed from what the tinker service records at sampling "
    "time, is not published; train with ppo, cispo or gspo",
}
"""Losses the tinker SDK names that Bios does not offer, and why."""


def loss_spec(name: str) -> LossSpec:
    """The spec of built-in loss `name`; InvalidRequestError (field `loss_fn`) if unknown,
    UnsupportedError for a loss of `UNPUBLISHED`."""
    if isinstance(name, str) and name in UNPUBLISHED:
        raise UnsupportedError(f"loss_fn: {name!r} is not offered by Bios: {UNPUBLISHED[name]}", field="loss_fn")
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise InvalidRequestError(
            f"loss_fn: unknown loss {name!r}; built-in losses are {', '.join(LOSSES)} "
            "(or pass a callable to forward_backward_custom)",
            field="loss_fn",
        ) from None
