"""Client-side evaluation of custom losses (docs/losses.md, L7).

The user's function sees the data and each datum's per-token logprobs and returns `(loss,
metrics)`; we take `∂loss/∂logprobs`, and the backend then backpropagates the linear surrogate
`Σ g·logprobs`, i.e. cross-entropy with weights `-g`. A function written with PyTorch (as the
tinker SDK's custom losses are: it reads `torch`, or fails on jax arrays the way torch code
does) gets `torch` tensors and is differentiated by autograd; any other gets `jax.numpy` arrays
and `jax.vjp`. Either needs that framework on the client only; it works the same on every
backend and transport.
"""

from __future__ import annotations

import functools
import inspect
import sys
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

    Raises UnsupportedError when the function's framework is missing, InvalidRequestError when
    `fn` does not return a finite scalar loss and a dict of metrics.
    """
    if _written_with_torch(fn):
        return _finished(*_torch_gradients(fn, data, logprobs))
    try:
        return _finished(*_jax_gradients(fn, data, logprobs))
    except (TypeError, AttributeError) as jax_error:  # what torch code does with jax arrays
        if "torch" not in sys.modules:
            raise
        try:
            return _finished(*_torch_gradients(fn, data, logprobs))
        except Exception:  # noqa: BLE001 - not torch code either: the first error is the one to see
            raise jax_error from None


def _finished(loss: float, metrics: dict, grads: list[np.ndarray]) -> tuple[float, dict[str, float], list[np.ndarray]]:
    if not np.isfinite(loss):
        raise InvalidRequestError(f"loss_fn returned a non-finite loss {loss}", field="loss_fn")
    return loss, {str(k): float(v) for k, v in metrics.items()}, grads


def _checked(out: object) -> tuple[Any, dict]:
    """`out` if it is (loss, metrics: dict), else InvalidRequestError."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise InvalidRequestError("loss_fn must return (loss, metrics: dict[str, float])", field="loss_fn")
    return out


def _written_with_torch(fn: CustomLossFn) -> bool:
    """Whether `fn` (a function, a `functools.partial` of one, or an object with `__call__`) is
    written with PyTorch: torch is loaded and a global or enclosing name its code reads is torch
    or a part of it (`torch`, `torch.nn.functional as F`, `from torch import cat`)."""
    if "torch" not in sys.modules:
        return False
    target: Any = fn.func if isinstance(fn, functools.partial) else fn
    if not inspect.isroutine(target):  # an object with a __call__ method
        target = type(target).__call__
    target = inspect.unwrap(target)
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        return False
    names = inspect.getclosurevars(target)
    return any(_from_torch(value) for value in (*names.globals.values(), *names.nonlocals.values()))


def _from_torch(value: object) -> bool:
    """Whether `value` is torch, one of its modules, or something defined in them."""
    home = getattr(value, "__name__", "") if inspect.ismodule(value) else getattr(value, "__module__", None)
    return isinstance(home, str) and home.split(".")[0] == "torch"


def _torch_gradients(
    fn: CustomLossFn, data: list[Datum], logprobs: Sequence[np.ndarray]
) -> tuple[float, dict, list[np.ndarray]]:
    import torch

    inputs = [torch.tensor(np.asarray(lp), dtype=torch.float32, requires_grad=True) for lp in logprobs]
    loss, metrics = _checked(fn(data, inputs))
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise InvalidRequestError(
            f"loss_fn must return a scalar torch tensor as its loss, got {type(loss).__name__} "
            f"of shape {tuple(getattr(loss, 'shape', ()))}",
            field="loss_fn",
        )
    loss.backward()
    grads = [np.zeros(len(x), np.float64) if x.grad is None else x.grad.double().numpy() for x in inputs]
    return float(loss.detach()), {k: float(v) for k, v in metrics.items()}, grads


def _jax_gradients(
    fn: CustomLossFn, data: list[Datum], logprobs: Sequence[np.ndarray]
) -> tuple[float, dict, list[np.ndarray]]:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        raise UnsupportedError(
            "forward_backward_custom needs jax on the client: pip install 'bios[jax]'", field="loss_fn"
        ) from None

    def loss_with_metrics(lps: list[jax.Array]) -> tuple[Any, dict[str, float]]:
        return _checked(fn(data, lps))

    with jax.default_device(jax.devices("cpu")[0]):
        inputs = [jnp.asarray(lp, dtype=jnp.float32) for lp in logprobs]
        loss, pullback, metrics = jax.vjp(loss_with_metrics, inputs, has_aux=True)
        if jnp.shape(loss) != ():
            raise InvalidRequestError(
                f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}", field="loss_fn"
            )
        (grads,) = pullback(jnp.ones_like(loss))
    return float(loss), {k: float(v) for k, v in metrics.items()}, [np.asarray(g, dtype=np.float64) for g in grads]


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
