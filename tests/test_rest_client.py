"""`RestClient` (`ServiceClient.create_rest_client()`): a session as a training run, its
checkpoints listed, deleted and given a time to live, external weights downloaded by URL, with
typed errors for bad ids. In-process and (`--remote`) served."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import MODEL, make_datum, random_batch
from safetensors.numpy import load as load_safetensors

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


def download(rest, path: str, into: Path) -> dict[str, bytes]:
    """Every file of external weights `path`, fetched by plain GET (no key) into `into`."""
    urls = rest.get_external_weights_urls(path).result()
    files = {name: urllib.request.urlopen(url).read() for name, url in urls.urls.items()}
    for name, content in files.items():
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        (into / name).write_bytes(content)
    return files


def test_external_weights_download_as_a_peft_adapter_with_a_time_to_live(
    service: bios.ServiceClient, tmp_path: Path
) -> None:
    rest = service.create_rest_client()
    training = service.create_lora_training_client(MODEL, rank=4, seed=11)
    training.train(random_batch(1), learning_rate=1e-2)
    external = training.save_weights_external("hf").result()
    assert (external.kind, external.path) == ("external", f"bios://{training.session_id}/external_weights/hf")
    assert external.expires_at is None and external.size_bytes

    files = download(rest, external.path, tmp_path)
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads(files["adapter_config.json"])
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("LORA", 4, MODEL)
    tensors = load_safetensors(files["adapter_model.safetensors"])
    assert tensors and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert max(np.abs(v).max() for k, v in tensors.items() if "lora_B" in k) > 0, "one step trains B away from 0"
    assert external.path in {c.path for c in rest.list_checkpoints(training.session_id).result().checkpoints}

    before = time.time()
    timed = rest.set_checkpoint_ttl_from_tinker_path(external.path, 3600).result()
    assert timed.expires_at == pytest.approx(before + 3600, abs=60)
    assert rest.set_checkpoint_ttl_from_tinker_path(external.path, None).result().expires_at is None
    rest.set_checkpoint_ttl_from_tinker_path(external.path, 0.3).result()
    time.sleep(0.5)
    with pytest.raises(bios.NotFoundError) as expired:
        rest.get_external_weights_urls(external.path)
    assert expired.value.field == "path" and "expired" in str(expired.value)
    assert external.path not in {c.path for c in rest.list_checkpoints(training.session_id).result().checkpoints}


def test_bad_external_weights_requests_are_typed_errors_that_change_nothing(service: bios.ServiceClient) -> None:
    rest = service.create_rest_client()
    training = service.create_lora_training_client(MODEL, rank=4, seed=12)
    state = training.save_state("state").result()
    external = training.save_weights_external("kept", ttl_seconds=3600).result()
    with pytest.raises(bios.InvalidRequestError) as bad_name:
        training.save_weights_external("../escape")
    assert bad_name.value.field == "name"
    with pytest.raises(bios.InvalidRequestError) as bad_ttl:
        training.save_weights_external("hf", ttl_seconds=-1)
    assert bad_ttl.value.field == "ttl_seconds"
    with pytest.raises(bios.InvalidRequestError) as bad_dtype:
        training.save_weights_external("hf", merged="float16")
    assert bad_dtype.value.field == "merged"
    with pytest.raises(bios.InvalidRequestError) as not_external:
        rest.get_external_weights_urls(state.path)
    assert not_external.value.field == "path" and "save_weights_external" in str(not_external.value)
    with pytest.raises(bios.InvalidRequestError) as malformed:
        rest.get_external_weights_urls("bios://nowhere")
    assert malformed.value.field == "path"
    with pytest.raises(bios.NotFoundError):
        rest.get_external_weights_urls(f"bios://{training.session_id}/external_weights/never-saved")
    for ttl in (0, -5, float("inf"), "1h", True):
        with pytest.raises(bios.InvalidRequestError) as bad:
            rest.set_checkpoint_ttl_from_tinker_path(external.path, ttl)  # type: ignore[arg-type]
        assert bad.value.field == "ttl_seconds"
    with pytest.raises(bios.NotFoundError):
        rest.set_checkpoint_ttl_from_tinker_path(f"bios://{training.session_id}/weights/never-saved", 60)
    listed = rest.list_checkpoints(training.session_id).result().checkpoints
    assert [(c.path, c.expires_at) for c in listed] == [(state.path, None), (external.path, external.expires_at)]
    assert training.train(random_batch(2), learning_rate=1e-2).step == 1, "the refusals took no sequence number"


@pytest.mark.inprocess  # a server loads only its own checkpoints, not a directory of the caller's
def test_downloaded_external_weights_load_back_with_the_same_logprobs(
    service: bios.ServiceClient, tmp_path: Path
) -> None:
    training = service.create_lora_training_client(MODEL, rank=4, alpha=8.0, seed=13)
    for _ in range(2):
        training.train(random_batch(3), learning_rate=1e-2)
    download(service.create_rest_client(), training.save_weights_external("hf").result().path, tmp_path)
    reloaded = service.create_training_client_from_state(tmp_path, base_model=MODEL)
    datum = [make_datum(list(range(5, 25)))]
    ours, theirs = (
        c.forward(datum, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data for c in (training, reloaded)
    )
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6)


def test_external_weights_with_a_merged_model_load_in_transformers_with_the_same_logprobs(
    service: bios.ServiceClient, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    training = service.create_lora_training_client(MODEL, rank=4, alpha=8.0, seed=14)
    for _ in range(2):
        training.train(random_batch(4), learning_rate=1e-2)
    external = training.save_weights_external("with-merged", merged="float32").result()
    files = download(service.create_rest_client(), external.path, tmp_path)
    assert {"adapter_config.json", "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json"} <= set(
        files
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32, attn_implementation="eager")
    tokens = list(range(5, 25))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens[:-1]]), use_cache=False).logits[0].double()
    theirs = logits.log_softmax(-1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy()
    ours = training.forward([make_datum(tokens)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)


def test_training_runs_are_listed_and_checkpoints_described_and_published(service: bios.ServiceClient) -> None:
    rest = service.create_rest_client()
    made = [service.create_lora_training_client(MODEL, rank=4, seed=15 + i) for i in range(4)]
    second = service.create_lora_training_client(MODEL, rank=8, alpha=4.0, seed=16)
    made.append(second)
    runs = rest.list_training_runs(limit=1000).result().training_runs
    ids = [run.session_id for run in runs]
    assert sorted(ids.index(c.session_id) for c in made) == [ids.index(c.session_id) for c in made], "oldest first"
    assert [
        run.session_id
        for run in rest.list_training_runs(limit=1, offset=ids.index(second.session_id)).result().training_runs
    ] == [second.session_id]

    second.train(random_batch(5), learning_rate=1e-2)
    state = second.save_state("described").result()
    info = rest.get_weights_info_by_tinker_path(state.path).result()
    assert (info.kind, info.base_model, info.step) == ("state", MODEL, 1)
    assert (info.lora_config.rank, info.lora_config.alpha) == (8, 4.0)

    assert rest.publish_checkpoint_from_tinker_path(state.path).result().public
    assert rest.publish_checkpoint_from_tinker_path(state.path).result().public, "harmless twice"
    assert [c.public for c in rest.list_checkpoints(second.session_id).result().checkpoints] == [True]
    assert not rest.unpublish_checkpoint_from_tinker_path(state.path).result().public

    for bad in ({"limit": 0}, {"offset": -1}, {"limit": True}):
        with pytest.raises(bios.InvalidRequestError) as refused:
            rest.list_training_runs(**bad)
        assert refused.value.field == next(iter(bad))
    with pytest.raises(bios.NotFoundError):
        rest.get_weights_info_by_tinker_path(f"bios://{second.session_id}/weights/never-saved")
    with pytest.raises(bios.InvalidRequestError):
        rest.publish_checkpoint_from_tinker_path("weights/described")
