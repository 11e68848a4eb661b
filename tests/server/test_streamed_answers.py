"""bios serve: work asked for with `Bios-Stream-Answer: 1` is answered on its own response (the
request id, then the envelope), the same envelope a poll gets, retries included; Bios's remote
client reads answers that way while it has a free poll slot, and polls otherwise, with the
same results as in-process."""

from __future__ import annotations

import json

import httpx
import pytest
from helpers import MODEL, random_batch
from server_process import ThreadedServer

import bios
from bios import types, wire
from bios.server import ServerOptions
from bios.transport.http import HttpTransport

STREAM = {wire.STREAM_ANSWER_HEADER: "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ThreadedServer(ServerOptions(backend="emulator", home=tmp_path_factory.mktemp("home"), no_auth=True)) as s:
        yield s


def _streamed(http: httpx.Client, path: str, body: dict, key: str) -> tuple[httpx.Response, list[str]]:
    with http.stream("POST", path, json=body, headers={**STREAM, wire.IDEMPOTENCY_HEADER: key}) as response:
        response.read()
    return response, response.text.splitlines()


def test_a_streamed_submit_carries_the_envelope_a_poll_gets_and_so_does_its_retry(server):
    training = bios.ServiceClient(base_url=server.url).create_lora_training_client(MODEL, rank=4, seed=1)
    http = httpx.Client(base_url=server.url)
    path = f"/v1/sessions/{training.session_id}/forward_backward"
    body = wire.ForwardBackward(seq=training._reserve(), data=random_batch(seed=1)).model_dump(mode="json")
    response, lines = _streamed(http, path, body, "fb-1")
    assert response.headers["content-type"] == wire.STREAM_MEDIA_TYPE and len(lines) == 2
    request_id = wire.Submitted.model_validate_json(lines[0]).request_id
    envelope = json.loads(lines[1])
    assert envelope["status"] == "done" and envelope["result"]["loss"] > 0
    assert http.get(f"/v1/requests/{request_id}").json() == envelope
    _, again = _streamed(http, path, body, "fb-1")  # a retry: the first request and its answer
    assert again == lines
    plain = http.post(path, json=body, headers={wire.IDEMPOTENCY_HEADER: "fb-1"})
    assert plain.headers["content-type"] == "application/json" and plain.json() == {"request_id": request_id}
    assert training.optim_step(types.AdamParams(learning_rate=1e-2)).result().step == 1  # applied once


def test_a_refused_streamed_submit_is_an_error_answer_and_changes_nothing(server):
    training = bios.ServiceClient(base_url=server.url).create_lora_training_client(MODEL, rank=4, seed=2)
    http = httpx.Client(base_url=server.url)
    path = f"/v1/sessions/{training.session_id}/forward_backward"
    response, _ = _streamed(http, path, {"seq": training._reserve(), "data": [], "backward": True}, "empty")
    assert response.status_code == 400 and response.json()["error"]["field"] == "data"
    assert training.forward_backward(random_batch(seed=2)).result().loss > 0  # its place was released
    assert training.get_info().step == 0


def test_the_client_reads_answers_from_the_submit_and_polls_when_no_slot_is_free(server):
    remote = HttpTransport(server.url, None, max_polls=1)
    sent: list[str] = []

    async def note(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    remote._wire._http.event_hooks["request"].append(note)
    lora = types.LoraConfig(rank=4, seed=3)
    session = remote.create_session(MODEL, lora).session_id
    twin = bios.ServiceClient(backend="emulator").create_lora_training_client(MODEL, lora_config=lora)
    adam = types.AdamParams(learning_rate=1e-2)
    batches = [random_batch(seed=10 + i) for i in range(3)]

    sent.clear()
    alone = remote.forward_backward(session, 0, batches[0]).result()  # a free slot: streamed, no poll
    assert not [s for s in sent if s.startswith("GET /v1/requests/")]
    assert alone.loss == twin.forward_backward(batches[0]).result().loss
    # The slot is held by an optim_step streamed first at seq 2, which cannot run before seq 1
    # arrives: the two requests sent after it are polled.
    held = remote.optim_step(session, 2, adam)
    late = [remote.forward_backward(session, 1, batches[1]), remote.optim_step(session, 3, adam)]
    assert late[0].result().loss == twin.forward_backward(batches[1]).result().loss
    assert [held.result().step, late[1].result().step] == [1, 2]
    assert len({s for s in sent if s.startswith("GET /v1/requests/")}) == 2
    twin.optim_step(adam).result()
    twin.optim_step(adam).result()
    assert remote.forward_backward(session, 4, batches[2]).result().loss == twin.forward(batches[2]).result().loss
    remote.close()
