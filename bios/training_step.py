"""One `TrainingClient.train` step: the Adam settings its keywords give, and the TrainingResult
its forward_backward and optim_step make together.

Imports the contract layer and the futures only.
"""

from __future__ import annotations

import math
from concurrent.futures import Future

from bios import validation
from bios.errors import InvalidRequestError
from bios.futures import TimedFuture
from bios.types import AdamParams, ForwardBackwardResult, OptimStepResult, TrainingResult

ADAM_KWARGS = {
    "weight_decay": "weight_decay",
    "grad_clip": "grad_clip_norm",
    "grad_clip_norm": "grad_clip_norm",
    "beta1": "beta1",
    "beta2": "beta2",
    "eps": "eps",
}
"""`train` keyword → AdamParams field."""


def settings(
    loss_fn: object, learning_rate: float, kwargs: dict[str, object]
) -> tuple[AdamParams, dict[str, float] | None]:
    """(Adam settings, loss_fn_config) of a `train` call, checked before anything is sent."""
    unknown = sorted(set(kwargs) - set(ADAM_KWARGS) - {"loss_fn_config"})
    if unknown:
        allowed = ", ".join(sorted(set(ADAM_KWARGS) | {"loss_fn_config"}))
        raise InvalidRequestError(
            f"train() got an unknown argument {unknown[0]!r}; allowed: {allowed}", field=unknown[0]
        )
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, (int, float))
        or not math.isfinite(learning_rate)
        or learning_rate < 0
    ):
        raise InvalidRequestError(
            f"learning_rate must be a finite number >= 0, got {learning_rate!r}", field="learning_rate"
        )
    adam = AdamParams(learning_rate=learning_rate, **{ADAM_KWARGS[k]: v for k, v in kwargs.items() if k in ADAM_KWARGS})
    if callable(loss_fn) and kwargs.get("loss_fn_config") is not None:
        raise InvalidRequestError("loss_fn_config applies to built-in losses only", field="loss_fn_config")
    return adam, validation.config_dict(kwargs.get("loss_fn_config"))


def combine(outer: TimedFuture, fb: ForwardBackwardResult, opt: Future[OptimStepResult]) -> None:
    """Resolve `outer` with the TrainingResult of `fb` and the finished optim_step `opt` (or its
    error); the metrics are both steps', with their retries added up."""
    outer.timing = opt.timing if isinstance(opt, TimedFuture) else None
    error = opt.exception()
    if error is not None:
        outer.set_exception(error)
        return
    step: OptimStepResult = opt.result()
    retries = fb.metrics.get("retries", 0.0) + step.metrics.get("retries", 0.0)
    metrics = {**fb.metrics, **step.metrics, **({"retries": retries} if retries else {})}
    outer.set_result(
        TrainingResult(
            loss=fb.loss, step=step.step, metrics=metrics, loss_fn_outputs=fb.loss_fn_outputs, timing=step.timing
        )
    )
