"""Custom losses (docs/losses.md L7): evaluated with jax or PyTorch on the client, exact gradients."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import MODEL, saved_weights

from bios import types

pytestmark = pytest.mark.api

TOKENS = [[0, 11, 250, 37, 900, 41, 5], [0, 77, 78, 79, 80]]


def _data(weights: bool = True) -> list[types.Datum]:
    data = []
    for tokens in TOKENS:
        inputs = {"target_tokens": tokens[1:]}
        if weights:
            inputs["weights"] = np.linspace(0.5, 1.5, len(tokens) - 1)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs))
    return data


def weighted_cross_entropy(data, logprobs):
    loss = sum(-(jnp.asarray(d.loss_fn_inputs["weights"].data) * lp).sum() for d, lp in zip(data, logprobs))
    return loss, {"tokens": float(sum(len(lp) for lp in logprobs))}


def torch_weighted_cross_entropy(data, logprobs, scale=1.0):
    """The tinker SDK's style: torch tensors in, a torch scalar out."""
    loss = sum(-(d.loss_fn_inputs["weights"].to_torch() * lp).sum() for d, lp in zip(data, logprobs)) * scale
    return loss, {"tokens": float(sum(lp.numel() for lp in logprobs))}


class TorchLoss:
    """A loss object with `__call__`, written with torch functions."""

    def __call__(self, data, logprobs):
        weights = [d.loss_fn_inputs["weights"].to_torch() for d in data]
        loss = -torch.stack([(w * lp).sum() for w, lp in zip(weights, logprobs)]).sum()
        return loss, {"tokens": float(torch.cat(logprobs).numel())}


@pytest.mark.parametrize(
    "custom_loss",
    [
        weighted_cross_entropy,
        torch_weighted_cross_entropy,
        functools.partial(torch_weighted_cross_entropy),
        TorchLoss(),
    ],
    ids=["jax", "torch", "torch partial", "torch object"],
)
def test_custom_cross_entropy_gives_the_built_in_gradient(service, custom_loss):
    built_in = service.create_lora_training_client(base_model=MODEL, rank=8, seed=3)
    custom = service.create_lora_training_client(base_model=MODEL, rank=8, seed=3)
    adam = types.AdamParams(learning_rate=1e-2)
    for _ in range(3):
        expected = built_in.forward_backward(_data(), "cross_entropy")
        expected_step = built_in.optim_step(adam)
        got = custom.forward_backward_custom(_data(), custom_loss)
        got_step = custom.optim_step(adam)  # queued behind the custom loss's backward
        assert np.isclose(got.result().loss, expected.result().loss, rtol=1e-6)
        assert got.result().metrics["tokens"] == 10.0
        assert np.isclose(
            got_step.result().metrics["grad_norm"], expected_step.result().metrics["grad_norm"], rtol=1e-6
        )
    a = saved_weights(built_in.save_state("builtin").result().path)
    b = saved_weights(custom.save_state("custom").result().path)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-9)


def test_a_pairwise_custom_loss_trains_through_train(service):
    client = service.create_lora_training_client(base_model=MODEL, rank=8, seed=4)

    def prefer_first(data, logprobs):
        margin = logprobs[0].sum() - logprobs[1].sum()
        return -jnp.log(1 / (1 + jnp.exp(-margin))), {"margin": margin}

    margins = [
        client.train(_data(weights=False), loss_fn=prefer_first, learning_rate=1e-2).metrics["margin"] for _ in range(5)
    ]
    assert margins[-1] > margins[0]
    assert client.get_info().step == 5


def test_a_failing_custom_loss_releases_the_session(service):
    client = service.create_lora_training_client(base_model=MODEL, rank=8, seed=5)

    def broken(data, logprobs):
        raise ZeroDivisionError("boom")

    failed = client.forward_backward_custom(_data(), broken)
    assert isinstance(failed.exception(), ZeroDivisionError)
    assert client.optim_step(types.AdamParams()).result().step == 1  # the order did not stall
