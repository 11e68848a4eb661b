"""The Tinker protocol of `bios serve` at the HTTP level: sequence order, retries, long polls,
sessions, refusals and the tensor encodings (the SDK itself runs in test_tinker_sdk.py)."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from server_process import ThreadedServer
from tinker_http import PROTOBUF, TOKENS, forward_backward, http, new_run, new_session, result

from bios.errors import NotFoundError
from bios.server.tinker import codec, proto, session_routes
from bios.server.tinker.sessions import Releases, Sampler, SessionExpiredError, Sessions
from bios.types import SampledSequence, SampleResult

KEY_A, KEY_B = "tml-protocol-alice-0123456789", "tml-protocol-bob-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from bios.server import ServerOptions

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIOS_API_KEYS", f"{KEY_A},{KEY_B}")
        with ThreadedServer(
            ServerOptions(backend="emulator", home=tmp_path_factory.mktemp("protocol-home"))
        ) as running:
            yield running


def test_a_runs_requests_execute_in_seq_order_and_retries_get_the_first_request(server, monkeypatch):
    alice, bob = http(server, KEY_A), http(server, KEY_B)
    _, model_id = new_run(alice)
    optim = {"model_id": model_id, "seq_id": 2, "type": "optim_step", "adam_params": {"learning_rate": 0.01}}
    step = alice.post("/optim_step", json=optim).json()["request_id"]  # seq 2 arrives before seq 1
    assert alice.post("/optim_step", json=optim).json()["request_id"] == step
    conflict = alice.post("/optim_step", json={**optim, "adam_params": {"learning_rate": 0.5}})
    assert conflict.status_code == 409
    monkeypatch.setattr(session_routes, "HOLD_S", 0.2)
    waiting = alice.post("/retrieve_future", json={"request_id": step, "allow_metadata_only": True})
    assert waiting.status_code == 408 and waiting.json() == {
        "type": "try_again",
        "request_id": step,
        "queue_state": "active",
    }
    assert bob.post("/retrieve_future", json={"request_id": step}).status_code == 404
    assert bob.post("/optim_step", json={**optim, "seq_id": 1}).status_code == 404, (
        "another key cannot use up the run's seq 1"
    )

    gradient = alice.post("/forward_backward", content=forward_backward(model_id, 1), headers=PROTOBUF).json()[
        "request_id"
    ]
    answer = result(alice, gradient)
    assert answer.headers["content-type"] == "application/x-protobuf"
    output = proto.ForwardBackwardOutput.FromString(answer.content)
    logprobs = np.frombuffer(output.loss_fn_outputs[0].fields["logprobs"].data, "<f4")
    assert output.loss_fn_outputs[0].num_datums == 1 and logprobs.size == len(TOKENS) - 1
    assert output.metrics["loss:sum"] == pytest.approx(-logprobs.sum(), rel=1e-5)
    stepped = result(alice, step).json()["metrics"]
    assert stepped["optimizer_step"] == 1.0 and stepped["grad_norm"] > 0, (
        "the optimizer step ran after the gradient of seq 1"
    )

    compressed = zstandard.ZstdCompressor().compress(forward_backward(model_id, 3, forward_only=True))
    forward = alice.post(
        "/forward_backward", content=compressed, headers={**PROTOBUF, "Content-Encoding": "zstd"}
    ).json()["request_id"]
    after = proto.ForwardBackwardOutput.FromString(result(alice, forward).content).metrics["loss:sum"]
    assert after < output.metrics["loss:sum"]
    for bad_seq in (0, -1):
        refused = alice.post("/forward_backward", content=forward_backward(model_id, bad_seq), headers=PROTOBUF)
        assert refused.status_code == 400 and refused.headers["content-length"] != "0"
    garbled = alice.post(
        "/forward_backward", content=b"\x28\xb5\x2f\xfd garbage", headers={**PROTOBUF, "Content-Encoding": "zstd"}
    )
    assert garbled.status_code == 400


def test_refused_requests_give_up_their_seq_id(server):
    alice = http(server, KEY_A)
    session, model_id = new_run(alice)
    custom = proto.ForwardBackwardRequest.FromString(forward_backward(model_id, 1))
    custom.loss_fn = "custom"
    assert alice.post("/forward_backward", content=custom.SerializeToString(), headers=PROTOBUF).status_code == 400
    external = alice.post(
        "/save_weights_external",
        json={"model_id": model_id, "seq_id": 2, "path": "hf", "age_encryption_recipients": ["age1x"]},
    )
    assert external.status_code == 400 and external.json()["error"]["field"] == "age_encryption_recipients"
    dimuon = alice.post(
        "/optim_step",
        json={"model_id": model_id, "seq_id": 3, "optimizer_params": {"type": "dimuon", "learning_rate": 0.1}},
    )
    assert dimuon.status_code == 400
    forward = alice.post(
        "/forward_backward", content=forward_backward(model_id, 4, forward_only=True), headers=PROTOBUF
    ).json()["request_id"]
    assert result(alice, forward).status_code == 200, "seq 4 runs: the refused seqs 1-3 do not hold the run"
    save = {"model_id": model_id, "path": "dup", "type": "save_weights"}
    assert (
        result(alice, alice.post("/save_weights", json={**save, "seq_id": 5}).json()["request_id"]).json()["path"]
        == f"tinker://{model_id}/weights/dup"
    )
    assert alice.post("/save_weights", json={**save, "seq_id": 6}).status_code == 400, (
        "an existing name needs overwrite=True"
    )
    assert (
        result(
            alice, alice.post("/save_weights", json={**save, "seq_id": 7, "overwrite": True}).json()["request_id"]
        ).status_code
        == 200
    )
    unsupported = {
        "session_id": session,
        "model_seq_id": 1,
        "base_model": "bios/tiny",
        "lora_config": {"rank": 4},
        "optimizer_config": {"type": "dimuon", "version": 1},
    }
    assert alice.post("/create_model", json=unsupported).status_code == 400


def test_an_unloaded_run_frees_its_adapter_and_stays_listed_with_its_checkpoints(server):
    alice, bob = http(server, KEY_A), http(server, KEY_B)
    _, model_id = new_run(alice)
    saved = alice.post("/save_weights", json={"model_id": model_id, "seq_id": 1, "path": "kept"}).json()["request_id"]
    path = result(alice, saved).json()["path"]
    assert bob.post("/unload_model", json={"model_id": model_id}).status_code == 404, "another key's run"
    assert alice.post("/unload_model", json={"model_id": "nobody:train:0"}).status_code == 404
    assert alice.post("/get_info", json={"model_id": model_id}).status_code == 200, "refusals unload nothing"

    unloaded = alice.post("/unload_model", json={"model_id": model_id, "type": "unload_model"}).json()
    assert unloaded["model_id"] == model_id
    assert result(alice, unloaded["request_id"]).json() == {"model_id": model_id, "type": "unload_model"}
    again = alice.post("/unload_model", json={"model_id": model_id}).json()["request_id"]
    assert result(alice, again).json()["model_id"] == model_id, "unloading twice is harmless"
    assert alice.post("/get_info", json={"model_id": model_id}).status_code == 404, "the adapter is gone"
    assert alice.get(f"/training_runs/{model_id}").json()["last_checkpoint"]["tinker_path"] == path
    assert path in [c["tinker_path"] for c in alice.get(f"/training_runs/{model_id}/checkpoints").json()["checkpoints"]]


def test_external_weights_urls_and_ttls_refuse_bad_input_and_change_nothing(server):
    import httpx

    alice, bob = http(server, KEY_A), http(server, KEY_B)
    _, model_id = new_run(alice)
    body = {"model_id": model_id, "seq_id": 1, "path": "hf", "ttl_seconds": 7200}
    external = result(alice, alice.post("/save_weights_external", json=body).json()["request_id"]).json()
    assert external["path"] == f"tinker://{model_id}/external_weights/hf" and external["size_bytes"] > 0
    state = result(alice, alice.post("/save_weights", json={**body, "seq_id": 2, "path": "st"}).json()["request_id"])
    checkpoints = f"/training_runs/{model_id}/checkpoints"

    def listed() -> list:
        return [(c["checkpoint_id"], c["checkpoint_type"]) for c in alice.get(checkpoints).json()["checkpoints"]]

    before = listed()
    assert before == [("external_weights/hf", "external"), ("weights/st", "training")]
    for bad in (0, -5, "1h"):
        refused = alice.put(f"{checkpoints}/external_weights/hf/ttl", json={"ttl_seconds": bad})
        assert refused.status_code == 400 and refused.json()["error"]["field"] == "ttl_seconds"
    assert bob.put(f"{checkpoints}/external_weights/hf/ttl", json={"ttl_seconds": 60}).status_code == 404
    not_external = alice.get(f"{checkpoints}/weights/st/external_weights_urls")
    assert not_external.status_code == 400 and not_external.json()["error"]["field"] == "path"
    assert alice.get(f"{checkpoints}/external_weights/nope/external_weights_urls").status_code == 404
    assert bob.get(f"{checkpoints}/external_weights/hf/external_weights_urls").status_code == 404
    assert listed() == before and state.status_code == 200

    signed = alice.get(f"{checkpoints}/external_weights/hf/external_weights_urls").json()
    url = signed["urls"]["adapter_config.json"]
    assert httpx.get(url).json()["peft_type"] == "LORA", "a signed URL needs no key"
    assert httpx.get(url.replace("adapter_config.json", "checkpoint.json")).status_code == 404
    token = url.split("/downloads/")[1].split("/")[0]
    forged = token[:-1] + ("1" if token.endswith("0") else "0")
    assert httpx.get(url.replace(token, forged)).status_code == 404, "a forged token"
    assert alice.put(f"{checkpoints}/external_weights/hf/ttl", json={"ttl_seconds": None}).status_code == 200
    assert alice.get(checkpoints).json()["checkpoints"][0]["checkpoint_id"] == "external_weights/hf"


def test_a_published_checkpoint_is_readable_by_any_key_until_unpublished(server):
    alice, bob = http(server, KEY_A), http(server, KEY_B)
    _, model_id = new_run(alice)
    saved = alice.post("/save_weights_for_sampler", json={"model_id": model_id, "seq_id": 1, "path": "shared"})
    path = result(alice, saved.json()["request_id"]).json()["path"]
    publish = f"/training_runs/{model_id}/checkpoints/sampler_weights/shared/publish"
    bob_session = new_session(bob)

    def bob_samples() -> int:
        body = {"session_id": bob_session, "sampling_session_seq_id": 0, "model_path": path}
        return bob.post("/create_sampling_session", json=body).status_code

    def listed_public() -> bool:
        return alice.get(f"/training_runs/{model_id}/checkpoints").json()["checkpoints"][0]["public"]

    assert bob_samples() == 404 and not listed_public()
    assert bob.post(publish).status_code == 404, "only the owner publishes"
    assert alice.post(publish).status_code == 200 and listed_public()
    assert alice.post(publish).status_code == 200 and listed_public(), "publishing twice is harmless"
    assert bob_samples() == 200
    assert bob.post("/weights_info", json={"tinker_path": path}).json()["lora_rank"] == 4
    assert bob.delete(f"/training_runs/{model_id}/checkpoints/sampler_weights/shared").status_code == 404
    assert alice.delete(publish).status_code == 200 and not listed_public()
    assert alice.delete(publish).status_code == 200 and not listed_public()
    assert bob.post("/weights_info", json={"tinker_path": path}).status_code == 404


def test_a_retried_unnamed_sampler_save_gets_the_first_sampling_session(server):
    alice = http(server, KEY_A)
    _, model_id = new_run(alice)
    save = {
        "model_id": model_id,
        "seq_id": 1,
        "sampling_session_seq_id": 0,
        "kind": "snapshot",
        "type": "save_weights_for_sampler",
    }
    first = alice.post("/save_weights_for_sampler", json=save).json()["request_id"]
    assert (
        alice.post("/save_weights_for_sampler", json={**save, "sampling_session_seq_id": 1}).json()["request_id"]
        == first
    )
    sampler = result(alice, first).json()["sampling_session_id"]
    assert alice.get(f"/samplers/{sampler}").json() == {
        "sampler_id": sampler,
        "base_model": "bios/tiny",
        "model_path": None,
    }
    sample = {
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]},
        "sampling_params": {"max_tokens": 3, "temperature": 0.0},
        "num_samples": 3,
        "sampling_session_id": sampler,
        "seq_id": 0,
        "prompt_logprobs": False,
        "type": "sample",
    }
    submitted = alice.post("/asample", json=sample).json()
    assert submitted["sample_sequence_ids"] == [f"{submitted['request_id']}:{i}" for i in range(3)]
    assert alice.post("/asample", json=sample).json() == submitted
    response = proto.SampleResponse.FromString(result(alice, submitted["request_id"]).content)
    assert len(response.sequences) == 3 and not response.HasField("prompt_logprobs")
    topk = alice.post("/asample", json={**sample, "seq_id": 1, "topk_sample_logprobs": 2})
    assert topk.status_code == 400 and topk.json()["error"]["field"] == "topk_sample_logprobs"
    assert not any(c.name.startswith("ephemeral-") for c in server.service.engine.list_checkpoints()), (
        "the snapshot is kept in no checkpoint"
    )


def test_sessions_heartbeat_finish_and_expire(server):
    alice, bob = http(server, KEY_A), http(server, KEY_B)
    session, model_id = new_run(alice)
    assert alice.post("/session_heartbeat", json={"session_id": session}).json() == {"type": "session_heartbeat"}
    assert bob.post("/session_heartbeat", json={"session_id": session}).status_code == 404
    assert bob.get(f"/sessions/{session}").status_code == 404 and session not in bob.get("/sessions").json()["sessions"]
    assert alice.get(f"/sessions/{session}").json()["training_run_ids"] == [model_id]
    for bad in ({"limit": 0}, {"offset": -1}, {"limit": "x"}):
        refused = alice.get("/sessions", params=bad)
        assert refused.status_code == 400 and refused.json()["error"]["field"] == next(iter(bad))
    assert http(server, "tml-not-a-key").post("/client/config", json={}).status_code == 401
    assert alice.post("/telemetry", json={"events": []}).json() == {"status": "accepted"}
    assert (
        alice.post(f"/sessions/{session}/finish", json={"reason": {"type": "success"}, "detail": None}).status_code
        == 200
    )
    assert alice.post("/session_heartbeat", json={"session_id": session}).status_code == 410
    assert (
        alice.post(
            "/create_model",
            json={"session_id": session, "model_seq_id": 1, "base_model": "bios/tiny", "lora_config": {"rank": 4}},
        ).status_code
        == 410
    )
    assert alice.post("/get_info", json={"model_id": model_id}).status_code == 404, (
        "the finished session's run was freed"
    )
    assert model_id in [r["training_run_id"] for r in alice.get("/training_runs").json()["training_runs"]], (
        "and is still listed"
    )

    freed = []
    releases = Releases(
        sampler=lambda *ids: freed.append(("sampler", *ids)),
        run=lambda *ids: freed.append(("run", *ids)),
        runs_of=lambda owner, session_id: ["bios-run-1"] if session_id == "sess-before-restart" else [],
    )
    sessions = Sessions(releases, expiry_s=0.0)
    expiring = sessions.create("owner")
    sessions.add_run("owner", expiring, "bios-run-0")
    assert sessions.add_sampler(Sampler("sampler-1", "owner", expiring, "bios/tiny", None), 0) == "sampler-1"
    with pytest.raises(SessionExpiredError):
        sessions.heartbeat("owner", expiring)
    assert freed == [("sampler", "owner", "sampler-1"), ("run", "owner", "bios-run-0")]
    sessions.expiry_s = 600.0
    sessions.heartbeat("owner", "sess-before-restart")  # known again by its runs
    with pytest.raises(NotFoundError):
        sessions.heartbeat("owner", "sess-unknown")
    sessions.finish("owner", "sess-before-restart")
    assert freed[-1] == ("run", "owner", "bios-run-1")


def test_sparse_tensors_and_prompt_logprob_tails_are_encoded_as_the_sdk_expects():
    tensor = proto.message_class("Tensor")(dtype=proto.DTYPE_FLOAT32)
    tensor.shape.extend([2, 3])
    csr = tensor.sparse_csr
    csr.values, csr.crow_indices, csr.col_indices = (
        np.asarray([1.5, -2.0], "<f4").tobytes(),
        np.asarray([0, 1, 2], "<i8").tobytes(),
        np.asarray([2, 0], "<i8").tobytes(),
    )
    assert codec.tensor_array(tensor, "weights").tolist() == [[0.0, 0.0, 1.5], [-2.0, 0.0, 0.0]]
    csr.col_indices = np.asarray([3, 0], "<i8").tobytes()
    with pytest.raises(Exception, match="out of range"):
        codec.tensor_array(tensor, "weights")

    sample = SampleResult(
        sequences=[SampledSequence(tokens=[4, 9], logprobs=[-0.5, -1.25], stop_reason="length")],
        prompt_logprobs=[None, -1.0, -2.0, -3.0],
    )
    response = proto.SampleResponse.FromString(codec.sample_response(sample, prompt_logprobs_last_n=2))
    assert (
        np.frombuffer(response.sequences[0].tokens, "<i4").tolist() == [4, 9] and response.sequences[0].stop_reason == 1
    )
    assert np.isnan(np.frombuffer(response.prompt_logprobs, "<f4")[:2]).all() and np.frombuffer(
        response.prompt_logprobs, "<f4"
    )[2:].tolist() == [-2.0, -3.0]


def test_stored_answers_are_served_in_the_tinker_encoding():
    import json

    from bios.errors import APIConnectionError, InvalidRequestError
    from bios.server.service import encode_error, encode_result
    from bios.server.tinker import answers

    assert answers.served("r", answers.proto_answer(bytes)(b"\x08\x01")).media_type == "application/x-protobuf"
    assert json.loads(answers.served("r", answers.failure(InvalidRequestError("bad"))).body) == {
        "error": "bad",
        "category": "user",
    }
    interrupted = answers.served("r", encode_error(APIConnectionError("the server restarted")))
    assert json.loads(interrupted.body) == {"error": "the server restarted", "category": "server"}
    gone = answers.served("r", answers.gone("submit it anew"))  # what a restart stores for a sample
    assert gone.status_code == 410 and json.loads(gone.body) == {"error": "submit it anew", "category": "server"}
    with pytest.raises(NotFoundError):
        answers.served("r", encode_result({"native": True}))


def test_a_restart_runs_the_requests_it_had_accepted_again_and_answers_a_sample_410(tmp_path, monkeypatch):
    """What a kill leaves pending: a run's save waiting in its lane for an earlier seq_id (run
    again at its number, under its id, once that seq_id arrives after the restart), a run's
    creation in a Tinker session with no run yet (run again, the session known again), one whose
    run was already filed (answered with it, no second run), a Tinker sample (410: the SDK's
    sampling client submits it anew) and a native sample (the retryable error its client
    resubmits on)."""
    import json

    from bios.errors import APIConnectionError, BiosError
    from bios.server import ServerOptions
    from bios.server.auth import owner_of
    from bios.server.db import RequestRow
    from bios.server.tinker.bodies import CreateModel

    monkeypatch.setenv("BIOS_API_KEYS", KEY_A)
    options, owner = ServerOptions(backend="emulator", home=tmp_path), owner_of(KEY_A)
    with ThreadedServer(options) as first:
        alice = http(first, KEY_A)
        session, model_id = new_run(alice)
        idle = new_session(alice)
        waiting = alice.post("/save_weights", json={"model_id": model_id, "seq_id": 2, "path": "kept"}).json()

        def creation(request_id: str, tinker_session: str, seed: int) -> RequestRow:
            body = CreateModel(
                session_id=tinker_session, model_seq_id=0, base_model="bios/tiny", lora_config={"rank": 4, "seed": seed}
            ).model_dump_json()
            return RequestRow(
                request_id, owner, "tinker.create_model", None, None, None, "-", "pending", None, None, body.encode()
            )

        for row in (
            creation("req-create", idle, 2),
            creation("req-created", session, 1),
            RequestRow("req-sample", owner, "tinker.sample", None, None, None, "-", "pending", None),
            RequestRow("req-native", owner, "sample", None, None, None, "-", "pending", None),
        ):
            first.service.records.add_request(row)
    with ThreadedServer(options) as second:
        alice = http(second, KEY_A)
        assert result(alice, "req-create").json() == {"model_id": f"{idle}:train:0", "type": "create_model"}
        assert result(alice, "req-created").json() == {"model_id": model_id, "type": "create_model"}
        assert len(second.service.records.sessions_of(owner)) == 2, "the filed run was not made twice"
        gone = result(alice, "req-sample")
        assert gone.status_code == 410 and "restarted" in gone.json()["error"]
        native = json.loads(second.service.answer(owner, "req-native"))
        assert isinstance(BiosError.from_dict(native["error"]), APIConnectionError)
        pending = [row.request_id for row in second.service.records.pending_requests()]
        assert pending == [waiting["request_id"]], "each was run again or answered; the save still waits"
        assert second.service.answer(owner, waiting["request_id"]) is None, "it waits for seq_id 1"
        alice.post("/forward_backward", content=forward_backward(model_id, 1, forward_only=True), headers=PROTOBUF)
        saved = result(alice, waiting["request_id"]).json()
        assert saved == {"path": f"tinker://{model_id}/weights/kept", "type": "save_weights"}
        trained = alice.post("/forward_backward", content=forward_backward(f"{idle}:train:0", 1), headers=PROTOBUF)
        assert result(alice, trained.json()["request_id"]).status_code == 200, "the run made again trains"
        assert alice.post("/session_heartbeat", json={"session_id": idle}).status_code == 200
