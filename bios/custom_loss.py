"""Client-side evaluation of custom losses (docs/losses.md, L7).

The user's function sees the data and each datum's per-token logprobs as `jax.numpy` arrays
and returns `(loss, metrics)`; we take `∂loss/∂logprobs` with `jax.vjp`, and the backend then
backpropagates the linear surrogate `Σ g·logprobs`, i.e. cross-entropy with weights `-g`. This
needs the `jax` extra on the client only; it works the same on every backend and transport.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bios.errors import InvalidRequestError, UnsupportedError
from bios.types import Datum, ModelInput

CustomLossFn = Callable[[list[Datum], Sequence[Any]], tuple[Any, dict[str, float]]]


def evaluate(
    fn: CustomLossFn, data: list[Datum], logprobs: Sequence[np.ndarray]
) -> tuple[float, dict[str, float], list[np.ndarray]]:
    """(loss, metrics, g) with g[i]: [T_i] float64 = ∂loss/∂logprobs[i].

    Raises UnsupportedError when jax is missing, InvalidRequestError when `fn` does not return
    a finite scalar loss and a dict of metrics.
    """
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        raise UnsupportedError(
            "forward_backward_custom needs jax on the client: pip install 'bios[jax]'", field="loss_fn"
        ) from None

    def loss_with_metrics(lps: list[jax.Array]) -> tuple[Any, dict[str, float]]:
        out = fn(data, lps)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise InvalidRequestError("loss_fn must return (loss, metrics: dict[str, float])", field="loss_fn")
        return out

    with jax.default_device(jax.devices("cpu")[0]):
        inputs = [jnp.asarray(lp, dtype=jnp.float32) for lp in logprobs]
        loss, pullback, metrics = jax.vjp(loss_with_metrics, inputs, has_aux=True)
        if jnp.shape(loss) != ():
            raise InvalidRequestError(
                f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}", field="loss_fn"
            )
        (grads,) = pullback(jnp.ones_like(loss))
    value = float(loss)
    if not np.isfinite(value):
        raise InvalidRequestError(f"loss_fn returned a non-finite loss {value}", field="loss_fn")
    return value, {str(k): float(v) for k, v in metrics.items()}, [np.asarray(g, dtype=np.float64) for g in grads]


def logprob_data(data: Sequence[Datum]) -> list[Datum]:
    """The data reduced to what computing logprobs needs: tokens and `target_tokens`."""
    reduced = []
    for i, datum in enumerate(data):
        if not isinstance(datum, Datum) or "target_tokens" not in datum.loss_fn_inputs:
            raise InvalidRequestError(
                f"data[{i}].loss_fn_inputs.target_tokens is missing; a "
                "custom loss needs the tokens whose logprobs it reads",
                field=f"data[{i}].loss_fn_inputs.target_tokens",
            )
        reduced.append(
            Datum(
                model_input=datum.model_input, loss_fn_inputs={"target_tokens": datum.loss_fn_inputs["target_tokens"]}
            )
        )
    return reduced


def surrogate_data(data: Sequence[Datum], grads: Sequence[np.ndarray]) -> list[Datum]:
    """Cross-entropy data whose gradient is the custom loss's: weights = -g (L7)."""
    return [
        Datum(
            model_input=ModelInput.from_ints(datum.model_input.to_ints()),
            loss_fn_inputs={
                "target_tokens": datum.loss_fn_inputs["target_tokens"],
                "weights": -np.asarray(g, dtype=np.float32),
            },
        )
        for datum, g in zip(data, grads, strict=True)
    ]
