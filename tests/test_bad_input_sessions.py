"""Bad input and the requests around it: a rejected request keeps no place in its session's
order, a failing train skips its optimizer step, unusual but valid metadata is stored as JSON, and
a sampler snapshot cannot resume training.
"""

from __future__ import annotations

import numpy as np
import pytest
from bad_requests import ADAM, GOOD, NOWHERE, PARAMS, PROBE, PROMPT, store

import bios
from bios import types
from bios.errors import InvalidRequestError, NotFoundError

pytestmark = pytest.mark.api


def test_requests_after_rejected_ones_still_run_in_order(training: bios.TrainingClient) -> None:
    """Rejected requests use up their place in the session's order without holding it: good
    requests submitted around them (without waiting) all complete, in submission order."""
    before = training.forward(PROBE)
    with pytest.raises(InvalidRequestError):
        training.forward_backward([])
    fb = training.forward_backward(GOOD)
    with pytest.raises(InvalidRequestError):
        training.sample(types.ModelInput.empty(), PARAMS)
    with pytest.raises(NotFoundError):
        training.load_state(NOWHERE)
    step = training.optim_step(ADAM)
    with pytest.raises(InvalidRequestError):
        training.save_state("../escape")
    after = training.forward(PROBE)
    sample = training.sample(PROMPT, PARAMS)
    assert fb.result(timeout=120).loss > 0
    assert step.result(timeout=120).step == 1
    assert after.result(timeout=120).loss < before.result(timeout=120).loss  # the step ran between them
    assert len(sample.result(timeout=120).sequences) == 1
    assert training.get_info().step == 1
    assert training.train(GOOD, learning_rate=1e-2).step == 2


def test_a_failing_train_skips_its_optimizer_step(training: bios.TrainingClient) -> None:
    with pytest.raises(InvalidRequestError) as info:
        training.train(GOOD, "ppo")  # cross-entropy data lacks the policy inputs
    assert info.value.field == "data[0].loss_fn_inputs.logprobs"
    assert training.get_info().step == 0
    assert training.optim_step(ADAM).result(timeout=120).metrics["grad_norm"] == 0.0


def test_unusual_but_valid_metadata_is_stored_as_json(training: bios.TrainingClient) -> None:
    """Tuples and numpy floats are JSON-able: accepted up front, never a late backend failure."""
    meta = {"shape": (2, 3), "nested": {"pair": ("a", None)}, "lr": np.float64(0.5), "ok": True}
    record = training.save_state("meta-tuples", metadata=meta).result(timeout=120)
    assert record.metadata == {"shape": [2, 3], "nested": {"pair": ["a", None]}, "lr": 0.5, "ok": True}
    assert store().record(record.path).metadata == record.metadata


def test_a_sampler_snapshot_cannot_resume_training(service, training):
    snapshot = training.save_weights_for_sampler("weights-only").result().path
    with pytest.raises(bios.InvalidRequestError) as err:
        service.create_training_client_from_state(snapshot)
    assert err.value.field == "path" and "save_state" in err.value.message
    with pytest.raises(bios.InvalidRequestError):
        training.load_state(snapshot)
    assert training.optim_step(types.AdamParams()).result().step == 1  # the session was untouched
