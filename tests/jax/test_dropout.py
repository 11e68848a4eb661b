"""LoRA dropout on the JAX backend (docs/losses.md M1): only in forward_backward, unbiased,
deterministic in (adapter seed, step, datum, layer, module)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers import MODEL, random_batch

import bios
from backends.jax.ops import Routing, lora_input
from bios import types


def test_masks_are_inverted_dropout_at_the_row_rate():
    x = jnp.ones((4, 64, 128))
    rates = jnp.array([0.0, 0.1, 0.3, 0.6])
    routing = Routing(
        jnp.zeros(1, jnp.int32),
        jnp.zeros(4 * 64),
        None,
        jax.vmap(jax.random.key)(jnp.arange(4, dtype=jnp.uint32)),
        rates,
    )
    dropped = np.asarray(lora_input(x, routing, site=3))
    for row, rate in enumerate(np.asarray(rates)):
        zeros = np.mean(dropped[row] == 0)
        assert abs(zeros - rate) < 0.02, (row, zeros)
        assert np.allclose(dropped[row][dropped[row] != 0], 1 / (1 - rate))
        assert abs(dropped[row].mean() - 1.0) < 0.05
    again = np.asarray(lora_input(x, routing, site=3))
    other_site = np.asarray(lora_input(x, routing, site=4))
    assert np.array_equal(dropped, again) and not np.array_equal(dropped[3], other_site[3])


def test_dropout_applies_to_forward_backward_only_and_is_deterministic():
    service = bios.ServiceClient(backend="jax")
    plain = service.create_lora_training_client(MODEL, rank=8, seed=3)
    dropped = service.create_lora_training_client(MODEL, rank=8, seed=3, dropout=0.5)
    twin = service.create_lora_training_client(MODEL, rank=8, seed=3, dropout=0.5)
    batch = random_batch(seed=51)
    for client in (plain, dropped, twin):
        client.train(batch, learning_rate=1e-2)  # makes B non-zero, so the masks matter from here on
    forward = [c.forward(batch).result().loss for c in (dropped, twin)]
    assert forward[0] == forward[1]
    trained = [c.forward_backward(batch).result() for c in (plain, dropped, twin)]
    assert trained[1].loss == trained[2].loss  # same seed, step and data: same masks
    assert not np.isclose(trained[1].loss, trained[0].loss, rtol=1e-4)  # the masks changed the LoRA term
    assert np.isclose(dropped.forward(batch).result().loss, forward[0])  # forward stays mask-free
    steps = [c.optim_step(types.AdamParams(learning_rate=1e-2)).result() for c in (dropped, twin)]
    assert steps[0].metrics["grad_norm"] == steps[1].metrics["grad_norm"]


def test_training_with_dropout_still_learns():
    client = bios.ServiceClient(backend="jax").create_lora_training_client(MODEL, rank=8, seed=4, dropout=0.1)
    batch = random_batch(seed=52)
    losses = [client.train(batch, learning_rate=1e-2).loss for _ in range(15)]
    assert losses[-1] < 0.6 * losses[0]
