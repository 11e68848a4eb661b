"""The built-in losses L1–L5 and L9 of docs/losses.md, one datum at a time: each gives the
elementwise loss `[T]` and its derivative with respect to the log-probabilities `lp` `[T]`.

Inputs are the datum's `loss_fn_inputs` (complete, optional ones filled) as float64 `[T]`
arrays; `config` is the resolved `loss_fn_config`. The sum over tokens and datums (L0) and the
chain rule into the weights (L6) belong to the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bios.errors import InvalidRequestError

LossResult = tuple[np.ndarray, np.ndarray]
"""(elementwise_loss [T], d elementwise_loss / d lp [T])."""


def _ratio(lp: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """`r[t] = exp(lp[t] - q[t])`, q the sampler's logprobs. [T]."""
    return np.exp(lp - inputs["logprobs"])


def _clip(r: np.ndarray, config: dict[str, float]) -> np.ndarray:
    """`clip(r) = min(max(r, clip_low_threshold), clip_high_threshold)`. [T]."""
    return np.minimum(np.maximum(r, config["clip_low_threshold"]), config["clip_high_threshold"])


def cross_entropy(lp: np.ndarray, inputs: dict[str, np.ndarray], config: dict[str, float]) -> LossResult:
    """L1 `-w[t]·lp[t]`, derivative `-w[t]`. lp, weights: [T]."""
    w = inputs["weights"]
    return -w * lp, -w


def importance_sampling(lp: np.ndarray, inputs: dict[str, np.ndarray], config: dict[str, float]) -> LossResult:
    """L2 `-r[t]·A[t]`, derivative `-r[t]·A[t]`. lp, logprobs, advantages: [T]."""
    value = -_ratio(lp, inputs) * inputs["advantages"]
    return value, value.copy()


def _clipped_surrogate(r: np.ndarray, adv: np.ndarray, config: dict[str, float]) -> LossResult:
    """`-min(r·A, clip(r)·A)` for a ratio `r` whose derivative w.r.t. lp[t] is its value: the
    derivative `-r·A` where `r·A <= clip(r)·A`, else 0. [T]."""
    unclipped, clipped = r * adv, _clip(r, config) * adv
    return -np.minimum(unclipped, clipped), np.where(unclipped <= clipped, -unclipped, 0.0)


def ppo(lp: np.ndarray, inputs: dict[str, np.ndarray], config: dict[str, float]) -> LossResult:
    """L3 `-min(r·A, clip(r)·A)`, derivative `-r·A` where `r·A <= clip(r)·A`, else 0. [T]."""
    return _clipped_surrogate(_ratio(lp, inputs), inputs["advantages"], config)


def gspo(lp: np.ndarray, inputs: dict[str, np.ndarray], config: dict[str, float]) -> LossResult:
    """L9: L3 with every token's ratio the sequence ratio `s = exp(mean over M of (lp - q))`,
    M the tokens `sequence_ratio_mask` marks (s = 1 when it marks none), each token carrying
    the gradient of its own lp only. [T]."""
    marked = inputs["sequence_ratio_mask"] != 0
    log_s = float(np.mean((lp - inputs["logprobs"])[marked])) if marked.any() else 0.0
    return _clipped_surrogate(np.full_like(lp, np.exp(log_s)), inputs["advantages"], config)


def cispo(lp: np.ndarray, inputs: dict[str, np.ndarray], config: dict[str, float]) -> LossResult:
    """L4 `-sg(clip(r))·lp·A`, derivative `-clip(r)·A`. [T]."""
    weight = _clip(_ratio(lp, inputs), config) * inputs["advantages"]
    return -weight * lp, -weight


def dro(lp: np.ndarray, inputs: dict[str, np.ndarray], config: dict[str, float]) -> LossResult:
    """L5 `-(lp·A - ½·beta·(lp - q)²)`, derivative `-(A - beta·(lp - q))`. [T]."""
    adv, drift, beta = inputs["advantages"], lp - inputs["logprobs"], config["beta"]
    return -(lp * adv - 0.5 * beta * drift**2), -(adv - beta * drift)


LOSSES: dict[str, Callable[[np.ndarray, dict[str, np.ndarray], dict[str, float]], LossResult]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}


def elementwise_loss(
    loss_fn: str, lp: np.ndarray, inputs: dict[str, np.ndarray], config: dict[str, float]
) -> LossResult:
    """L1–L5 by name: (elementwise loss [T], its derivative w.r.t. lp [T]).

    Inputs other than `target_tokens` are cast to float64. Raises InvalidRequestError
    (field `loss_fn`) for a name that is not a built-in loss.
    """
    fn = LOSSES.get(loss_fn)
    if fn is None:
        raise InvalidRequestError(f"loss_fn: unknown loss {loss_fn!r}; built-in: {', '.join(LOSSES)}", field="loss_fn")
    floats = {name: np.asarray(value, dtype=np.float64) for name, value in inputs.items() if name != "target_tokens"}
    return fn(lp, floats, config)
