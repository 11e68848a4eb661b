"""bios serve: API keys, ownership (another key's objects are not found), idempotency, limits,
and batching of concurrent tenants into shared backend calls."""

from __future__ import annotations

import gc
import threading
import time

import httpx
import pytest
from helpers import MODEL, random_batch
from server_process import ThreadedServer

import bios
from bios import types
from bios.server import ServerOptions, check_bind, load_catalog
from bios.transport.http import HttpTransport

KEY_A, KEY_B = "tml-tenant-a-0123456789", "tml-tenant-b-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("BIOS_API_KEYS", f"{KEY_A},{KEY_B}")
    home = tmp_path_factory.mktemp("server-home")
    with ThreadedServer(ServerOptions(backend="emulator", home=home, max_body_bytes=1 << 20)) as running:
        yield running


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _client(server, key: str | None) -> bios.ServiceClient:
    return bios.ServiceClient(base_url=server.url, api_key=key)


def _http(server, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"} if key else {})


def test_requests_without_a_valid_key_are_refused(server):
    for key in (None, "tml-not-a-key"):
        with pytest.raises(bios.AuthenticationError) as err:
            _client(server, key).get_server_capabilities()
        assert err.value.field == "api_key"
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert "/v1/sessions/{session_id}/forward_backward" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_a_key_can_neither_see_nor_touch_another_keys_objects(server):
    alice = _client(server, KEY_A)
    training = alice.create_lora_training_client(MODEL, rank=4, seed=1)
    batch = random_batch(seed=1)
    training.train(batch, learning_rate=1e-2)
    state = training.save_state("private").result().path
    frozen = training.save_weights_for_sampler("private-sampler").result().path
    sampler = alice.create_sampling_client(model_path=frozen)
    (sampler_id,) = [sid for sid, _, _, path in server.service.records.all_samplers() if path == frozen]
    before = training.forward(batch).result().loss
    request_id = (
        _http(server, KEY_A)
        .post(
            f"/v1/sessions/{training.session_id}/forward_backward",
            json={"seq": training._reserve(), "data": [d.model_dump(mode="json") for d in batch], "backward": False},
        )
        .json()["request_id"]
    )

    bob = _client(server, KEY_B)
    bob_http = _http(server, KEY_B)
    sid = training.session_id
    attempts = {
        "session info": lambda: bob.transport.session_info(sid),
        "next seq": lambda: bob.transport.next_seq(sid),
        "forward_backward": lambda: bob.transport.forward_backward(sid, 99, batch),
        "optim_step": lambda: bob.transport.optim_step(sid, 99, types.AdamParams()),
        "sample": lambda: bob.transport.sample(sid, 99, types.ModelInput.from_ints([1, 2]), types.SamplingParams()),
        "save_state": lambda: bob.transport.save_state(sid, 99, "stolen"),
        "load_state into own session": lambda: bob.create_lora_training_client(MODEL, rank=4).load_state(state),
        "resume from state": lambda: bob.create_training_client_from_state(state),
        "sample from snapshot": lambda: bob.create_sampling_client(model_path=frozen),
        "use sampler": lambda: bob.transport.sampler_sample(
            sampler_id, types.ModelInput.from_ints([1, 2]), types.SamplingParams()
        ),
        "delete checkpoint": lambda: bob.transport.delete_checkpoint(state),
        "list session checkpoints": lambda: bob.transport.list_checkpoints(sid),
    }
    for what, attempt in attempts.items():
        with pytest.raises(bios.NotFoundError):
            attempt()
            pytest.fail(f"{what}: key B was not refused")
    assert bob_http.get(f"/v1/requests/{request_id}").status_code == 404
    assert bob_http.delete(f"/v1/samplers/{sampler_id}").status_code == 404
    assert bob.transport.list_checkpoints() == []
    # nothing of alice's changed, and she still sees and uses all of it
    assert _http(server, KEY_A).get(f"/v1/requests/{request_id}", params={"wait": 10}).json()["status"] == "done"
    assert training.forward(batch).result().loss == before
    assert {state, frozen} <= {c.path for c in alice.transport.list_checkpoints(sid)}
    assert (
        sampler.sample(types.ModelInput.from_ints([1, 2]), types.SamplingParams(max_tokens=3, temperature=0.0))
        .result()
        .sequences
    )


def test_a_published_checkpoint_is_readable_by_another_key_until_unpublished(server):
    alice, bob = _client(server, KEY_A), _client(server, KEY_B)
    training = alice.create_lora_training_client(MODEL, rank=4, seed=21)
    training.train(random_batch(seed=21), learning_rate=1e-2)
    state = training.save_state("shared").result()
    bob_rest = bob.create_rest_client()
    with pytest.raises(bios.NotFoundError):
        bob_rest.get_weights_info_by_tinker_path(state.path)
    with pytest.raises(bios.NotFoundError):
        bob_rest.publish_checkpoint_from_tinker_path(state.path)
    alice.create_rest_client().publish_checkpoint_from_tinker_path(state.path).result()
    assert bob_rest.get_weights_info_by_tinker_path(state.path).result().step == 1
    resumed = bob.create_training_client_from_state_with_optimizer(state.path)
    assert resumed.get_info().step == 1 and resumed.session_id in {
        run.session_id for run in bob_rest.list_training_runs(limit=1000).result().training_runs
    }
    assert training.session_id not in {
        run.session_id for run in bob_rest.list_training_runs(limit=1000).result().training_runs
    }
    with pytest.raises(bios.NotFoundError):
        bob_rest.delete_checkpoint_from_tinker_path(state.path)
    alice.create_rest_client().unpublish_checkpoint_from_tinker_path(state.path).result()
    with pytest.raises(bios.NotFoundError):
        bob.create_sampling_client(model_path=state.path)


def test_a_retried_request_is_applied_once_and_a_reused_key_is_a_conflict(server):
    client = _client(server, KEY_A)
    training = client.create_lora_training_client(MODEL, rank=4, seed=2)
    training.forward_backward(random_batch(seed=2)).result()
    http = _http(server, KEY_A)
    body = {"seq": training._reserve(), "adam_params": types.AdamParams(learning_rate=1e-2).model_dump(mode="json")}
    path = f"/v1/sessions/{training.session_id}/optim_step"
    first = http.post(path, json=body, headers={"Idempotency-Key": "step-1"}).json()["request_id"]
    again = http.post(path, json=body, headers={"Idempotency-Key": "step-1"}).json()["request_id"]
    assert first == again
    answer = http.get(f"/v1/requests/{first}", params={"wait": 10}).json()
    assert answer["status"] == "done" and answer["result"]["step"] == 1
    assert training.get_info().step == 1
    conflict = http.post(path, json={**body, "seq": body["seq"] + 1}, headers={"Idempotency-Key": "step-1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == bios.ConflictError.code
    assert training.optim_step().result().step == 2  # the session goes on in order


def test_a_rejected_request_is_rejected_again_on_retry_and_releases_its_place(server):
    http = _http(server, KEY_A)
    training = _client(server, KEY_A).create_lora_training_client(MODEL, rank=4, seed=3)
    body = {"seq": training._reserve(), "data": [], "backward": True}
    for _ in range(2):
        refused = http.post(
            f"/v1/sessions/{training.session_id}/forward_backward", json=body, headers={"Idempotency-Key": "empty"}
        )
        assert refused.status_code == 400 and refused.json()["error"]["field"] == "data"
    assert training.forward_backward(random_batch(seed=3)).result().loss > 0


def test_oversized_bodies_get_413(server):
    training = _client(server, KEY_A).create_lora_training_client(MODEL, rank=4, seed=4)
    huge = [
        types.Datum(model_input=types.ModelInput.from_ints([5] * 200), loss_fn_inputs={"target_tokens": [6] * 200})
    ] * 3000
    with pytest.raises(bios.BiosError) as err:
        training.forward_backward(huge)
    assert err.value.status == 413 and err.value.field == "body"
    assert training.forward_backward(random_batch(seed=4)).result().loss > 0


def test_concurrent_tenants_share_backend_calls(server):
    engine = server.service.engine
    sessions = [
        _client(server, key).create_lora_training_client(MODEL, rank=4, seed=i)
        for i, key in enumerate([KEY_A, KEY_B] * 4)
    ]
    batches = [random_batch(seed=10 + i) for i in range(len(sessions))]
    gate = threading.Event()
    blocker = engine.scheduler.call(gate.wait)  # hold the worker so every request is queued first
    futures = [s.forward_backward(batch) for s, batch in zip(sessions, batches)]
    calls_before = engine.scheduler.backend_calls
    gate.set()
    blocker.result()
    losses = [f.result().loss for f in futures]
    assert engine.scheduler.backend_calls - calls_before == 1, (
        "eight sessions of two keys should share one forward_backward call"
    )
    alone = bios.ServiceClient(backend="emulator").create_lora_training_client(MODEL, rank=4)
    assert losses == pytest.approx([alone.forward(batch).result().loss for batch in batches], rel=1e-12)


def test_an_unreachable_server_is_a_connection_error_after_retrying():
    with pytest.raises(bios.APIConnectionError) as err:
        HttpTransport("http://127.0.0.1:9", None).capabilities()
    assert "127.0.0.1:9" in str(err.value)


def test_no_auth_binds_only_to_loopback_and_catalogs_are_checked(tmp_path):
    check_bind("127.0.0.1", True), check_bind("::1", True), check_bind("0.0.0.0", False)
    with pytest.raises(bios.InvalidRequestError) as err:
        check_bind("0.0.0.0", True)
    assert err.value.field == "host"
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[[model]]\nname = "bios/tiny"\n')
    assert load_catalog(catalog).names() == ["bios/tiny"]
    catalog.write_text('[[model]]\nname = "no/such"\n')
    with pytest.raises(bios.InvalidRequestError) as err:
        load_catalog(catalog)
    assert err.value.field == "models" and "path" in err.value.message


def test_a_dropped_remote_training_client_ends_its_server_session(server):
    training = _client(server, KEY_A).create_lora_training_client(MODEL, rank=4, seed=6)
    session_id = training.session_id
    training.train(random_batch(seed=6), learning_rate=1e-2)
    journal = server.service.journal
    assert journal.read(session_id).state.step == 1
    del training
    gc.collect()  # the client ends its server session in the background
    server.service.wait_until(lambda: journal.read(session_id) is None, timeout=10)
    assert journal.read(session_id) is None  # not restored after a restart either
    with pytest.raises(bios.NotFoundError):
        server.service.engine.session_info(session_id)


def test_many_long_polls_on_one_request_hold_no_thread_and_all_get_its_answer(server):
    import asyncio

    engine = server.service.engine
    training = _client(server, KEY_A).create_lora_training_client(MODEL, rank=4, seed=7)
    gate = threading.Event()
    blocker = engine.scheduler.call(gate.wait)
    http = _http(server, KEY_A)
    body = {
        "seq": training._reserve(),
        "data": [d.model_dump(mode="json") for d in random_batch(seed=7)],
        "backward": False,
    }
    request_id = http.post(f"/v1/sessions/{training.session_id}/forward_backward", json=body).json()["request_id"]

    async def poll_all(count: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count + 5)  # room for the health check beside the polls
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {KEY_A}"}, limits=limits, timeout=60
        ) as client:
            polls = [
                asyncio.create_task(client.get(f"/v1/requests/{request_id}", params={"wait": 30})) for _ in range(count)
            ]
            waiting = lambda: server.service.waiting_polls(request_id) == count
            assert await asyncio.to_thread(server.service.wait_until, waiting, 60)  # every poll waits on the server
            health = await client.get("/healthz")  # the server still answers at once
            assert health.status_code == 200 and not any(p.done() for p in polls)
            gate.set()
            return await asyncio.gather(*polls)

    answers = asyncio.run(poll_all(500))
    blocker.result()
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1 and answers[0].json()["status"] == "done"


def test_answers_are_forgotten_after_the_retention_period(server):
    training = _client(server, KEY_A).create_lora_training_client(MODEL, rank=4, seed=8)
    http = _http(server, KEY_A)
    body = {
        "seq": training._reserve(),
        "data": [d.model_dump(mode="json") for d in random_batch(seed=8)],
        "backward": False,
    }
    request_id = http.post(f"/v1/sessions/{training.session_id}/forward_backward", json=body).json()["request_id"]
    assert http.get(f"/v1/requests/{request_id}", params={"wait": 10}).status_code == 200
    assert server.service.prune(now=time.time() + server.service.retention_s + 1) >= 1
    assert http.get(f"/v1/requests/{request_id}").status_code == 404
