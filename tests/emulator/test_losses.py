"""The emulator's losses L1–L5 and L9 on hand-picked numbers, against the table of docs/losses.md."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bios.errors import InvalidRequestError
from emulator.losses import elementwise_loss

CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
LN2 = math.log(2.0)


def policy_inputs(lp_minus_q: list[float], advantages: list[float], q: float = -1.0) -> tuple[np.ndarray, dict]:
    """lp and inputs with sampler logprobs q, so that r = exp(lp - q) is chosen exactly."""
    lp = q + np.array(lp_minus_q)
    inputs = {
        "target_tokens": np.zeros(len(lp), dtype=np.int64),
        "logprobs": np.full(len(lp), q),
        "advantages": np.array(advantages),
    }
    return lp, inputs


def test_cross_entropy_l1():
    lp = np.array([-1.0, -2.0, -0.5])
    inputs = {"target_tokens": np.array([1, 2, 3]), "weights": np.array([1.0, 0.5, -2.0], dtype=np.float32)}
    loss, d_lp = elementwise_loss("cross_entropy", lp, inputs, {})
    np.testing.assert_allclose(loss, [1.0, 1.0, -1.0])
    np.testing.assert_allclose(d_lp, [-1.0, -0.5, 2.0])
    assert loss.dtype == np.float64


def test_importance_sampling_l2():
    lp, inputs = policy_inputs([LN2, 0.0, -LN2], [3.0, -1.0, 2.0])  # r = 2, 1, 0.5
    loss, d_lp = elementwise_loss("importance_sampling", lp, inputs, {})
    np.testing.assert_allclose(loss, [-6.0, 1.0, -1.0])
    np.testing.assert_allclose(d_lp, [-6.0, 1.0, -1.0])


def test_ppo_l3_picks_the_clipped_branch_far_from_one():
    # r = 2, 2, 0.5, 0.5, 1 with A = +1, -1, +1, -1, +2
    lp, inputs = policy_inputs([LN2, LN2, -LN2, -LN2, 0.0], [1.0, -1.0, 1.0, -1.0, 2.0])
    loss, d_lp = elementwise_loss("ppo", lp, inputs, CLIP)
    # r=2,A=1: min(2, 1.2) = 1.2 clipped; r=2,A=-1: min(-2, -1.2) = -2 unclipped;
    # r=.5,A=1: min(.5, .8) = .5 unclipped; r=.5,A=-1: min(-.5, -.8) = -.8 clipped; r=1,A=2: 2 unclipped.
    np.testing.assert_allclose(loss, [-1.2, 2.0, -0.5, 0.8, -2.0])
    np.testing.assert_allclose(d_lp, [0.0, 2.0, -0.5, 0.0, -2.0])


def test_ppo_l3_respects_configured_thresholds():
    lp, inputs = policy_inputs([LN2], [1.0])  # r = 2
    loss, d_lp = elementwise_loss("ppo", lp, inputs, {"clip_low_threshold": 0.5, "clip_high_threshold": 3.0})
    np.testing.assert_allclose(loss, [-2.0])
    np.testing.assert_allclose(d_lp, [-2.0])


def test_cispo_l4_clips_the_ratio_and_stops_its_gradient():
    lp, inputs = policy_inputs([LN2, -LN2, 0.1], [1.0, 2.0, -1.0], q=0.0)  # r = 2, 0.5, e^0.1
    loss, d_lp = elementwise_loss("cispo", lp, inputs, CLIP)
    r3 = math.exp(0.1)
    np.testing.assert_allclose(loss, [-1.2 * LN2, -0.8 * -LN2 * 2.0, r3 * 0.1])
    np.testing.assert_allclose(d_lp, [-1.2, -1.6, r3])


def test_gspo_l9_clips_the_sequence_ratio_over_the_marked_tokens_only():
    # lp - q = ln 2, ln 2, 5 (unmarked): s = exp(mean(ln 2, ln 2)) = 2 for every token
    lp, inputs = policy_inputs([LN2, LN2, 5.0], [1.0, -1.0, 1.0])
    inputs["sequence_ratio_mask"] = np.array([1.0, 1.0, 0.0])
    loss, d_lp = elementwise_loss("gspo", lp, inputs, CLIP)
    np.testing.assert_allclose(loss, [-1.2, 2.0, -1.2])  # s = 2 > 1.2: A > 0 clipped, A < 0 not
    np.testing.assert_allclose(d_lp, [0.0, 2.0, 0.0])
    # s = exp(mean(0.1, -0.3)) = e^-0.1, inside the clip range: every token is -s·A with derivative -s·A
    lp, inputs = policy_inputs([0.1, -0.3, 0.0], [2.0, 1.0, -1.0])
    inputs["sequence_ratio_mask"] = np.array([1.0, 1.0, 0.0])
    s = math.exp(-0.1)
    loss, d_lp = elementwise_loss("gspo", lp, inputs, CLIP)
    np.testing.assert_allclose(loss, [-2 * s, -s, s])
    np.testing.assert_allclose(d_lp, [-2 * s, -s, s])
    inputs["sequence_ratio_mask"] = np.zeros(3)  # nothing marked: s = 1
    np.testing.assert_allclose(elementwise_loss("gspo", lp, inputs, CLIP)[0], [-2.0, -1.0, 1.0])


def test_dro_l5():
    lp = np.array([-1.0, -3.0])
    inputs = {
        "target_tokens": np.array([0, 0]),
        "logprobs": np.array([-2.0, -3.0]),
        "advantages": np.array([0.5, -1.0]),
    }
    loss, d_lp = elementwise_loss("dro", lp, inputs, {"beta": 0.1})
    # -(lp·A - ½β(lp-q)²): -(-0.5 - 0.05) = 0.55 and -(3 - 0) = -3
    np.testing.assert_allclose(loss, [0.55, -3.0])
    # -(A - β(lp-q)): -(0.5 - 0.1) = -0.4 and -(-1 - 0) = 1
    np.testing.assert_allclose(d_lp, [-0.4, 1.0])


@pytest.mark.parametrize(
    "loss_fn,config",
    [
        ("cross_entropy", {}),
        ("importance_sampling", {}),
        ("ppo", CLIP),
        ("dro", {"beta": 0.3}),
    ],
)
def test_derivative_is_the_derivative_of_the_elementwise_loss(loss_fn, config):
    rng = np.random.default_rng(1)
    lp = rng.normal(-2.0, 0.5, 20)
    inputs = {
        "target_tokens": np.zeros(20, dtype=np.int64),
        "weights": rng.normal(size=20),
        "logprobs": lp + rng.normal(0.0, 0.4, 20),
        "advantages": rng.normal(size=20),
    }
    _, d_lp = elementwise_loss(loss_fn, lp, inputs, config)
    h = 1e-6
    plus, _ = elementwise_loss(loss_fn, lp + h, inputs, config)
    minus, _ = elementwise_loss(loss_fn, lp - h, inputs, config)
    np.testing.assert_allclose((plus - minus) / (2 * h), d_lp, rtol=1e-6, atol=1e-8)


def test_unknown_loss_is_an_invalid_request():
    with pytest.raises(InvalidRequestError) as info:
        elementwise_loss("mse", np.zeros(2), {"target_tokens": np.zeros(2)}, {})
    assert info.value.field == "loss_fn"
