"""`RestClient` (`ServiceClient.create_rest_client()`): a session as a training run, its
checkpoints listed and deleted, with typed errors for bad ids. In-process and (`--remote`) served."""

from __future__ import annotations

import asyncio

import pytest
from helpers import MODEL, random_batch

import bios
from bios import types

pytestmark = pytest.mark.api


def test_runs_and_checkpoints_are_listed_and_deleted(service: bios.ServiceClient) -> None:
    rest = service.create_rest_client()
    training = service.create_lora_training_client(MODEL, rank=4, seed=9)
    training.train(random_batch(1), learning_rate=1e-2)
    state = training.save_state("kept", user_metadata={"epoch": "1"}).result()
    doomed = training.save_state("doomed").result()
    frozen = training.save_weights_for_sampler("frozen").result()

    run = rest.get_training_run(training.session_id).result()
    assert (run.session_id, run.base_model, run.step) == (training.session_id, MODEL, 1)
    listed = rest.list_checkpoints(training.session_id).result()
    assert isinstance(listed, types.CheckpointList)
    assert [c.path for c in listed.checkpoints] == [state.path, doomed.path, frozen.path]
    assert listed.checkpoints[0].metadata == {"epoch": "1"} and all(c.size_bytes for c in listed.checkpoints)
    assert {state.path, doomed.path, frozen.path} <= {c.path for c in rest.list_user_checkpoints().result().checkpoints}

    assert rest.delete_checkpoint(training.session_id, "weights/doomed").result() is None
    rest.delete_checkpoint_from_tinker_path(frozen.path).result()
    assert [c.path for c in rest.list_checkpoints(training.session_id).result().checkpoints] == [state.path]
    with pytest.raises(bios.NotFoundError) as gone:
        service.create_training_client_from_state(doomed.path)
    assert gone.value.field == "path"

    async def twins() -> tuple[types.TrainingInfo, types.CheckpointList]:
        return await rest.get_training_run_async(training.session_id), await rest.list_checkpoints_async(
            training.session_id
        )

    again, still = asyncio.run(twins())
    assert again == run and [c.path for c in still.checkpoints] == [state.path]


def test_bad_ids_are_typed_errors_that_delete_nothing(service: bios.ServiceClient) -> None:
    rest = service.create_rest_client()
    training = service.create_lora_training_client(MODEL, rank=4, seed=10)
    kept = training.save_state("kept").result()
    with pytest.raises(bios.InvalidRequestError) as bad_id:
        rest.delete_checkpoint(training.session_id, "kept")
    assert bad_id.value.field == "checkpoint_id"
    with pytest.raises(bios.InvalidRequestError) as bad_path:
        rest.delete_checkpoint_from_tinker_path("/tmp/kept")
    assert bad_path.value.field == "path"
    with pytest.raises(bios.NotFoundError):
        rest.delete_checkpoint(training.session_id, "weights/never-saved")
    with pytest.raises(bios.NotFoundError):
        rest.get_training_run("session-000000000000")
    assert [c.path for c in rest.list_checkpoints(training.session_id).result().checkpoints] == [kept.path]
