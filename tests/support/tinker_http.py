"""The Tinker protocol spoken by hand over HTTP (the SDK itself runs in test_tinker_sdk.py):
a client for a key, polling a request's result, a fresh run, a forward_backward body."""

from __future__ import annotations

import numpy as np

from bios.server.tinker import proto

TOKENS = [5, 17, 99, 3, 250, 7, 41, 8]


def http(server, key: str):
    import httpx

    return httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": key}, timeout=60)


def result(client, request_id: str):
    while True:
        answer = client.post("/retrieve_future", json={"request_id": request_id, "allow_metadata_only": True})
        if answer.status_code != 408:
            return answer


def new_session(client) -> str:
    """A new Tinker session's id."""
    return client.post(
        "/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "test", "type": "create_session"}
    ).json()["session_id"]


def new_run(client) -> tuple[str, str]:
    """(session id, model id) of a fresh rank-4 run on the tiny model."""
    session = new_session(client)
    body = {
        "session_id": session,
        "model_seq_id": 0,
        "base_model": "bios/tiny",
        "lora_config": {"rank": 4, "seed": 1},
        "type": "create_model",
    }
    submitted = client.post("/create_model", json=body).json()
    assert result(client, submitted["request_id"]).json() == {"model_id": f"{session}:train:0", "type": "create_model"}
    return session, submitted["model_id"]


def forward_backward(model_id: str, seq_id: int, forward_only: bool = False) -> bytes:
    """A serialised ForwardBackwardRequest of one next-token datum over TOKENS."""
    request = proto.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy", forward_only=forward_only
    )
    datum = request.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray(TOKENS[:-1], "<i4").tobytes()
    target = datum.loss_fn_inputs["target_tokens"]
    target.dense, target.dtype = np.asarray(TOKENS[1:], "<i8").tobytes(), proto.DTYPE_INT64
    target.shape.append(len(TOKENS) - 1)
    return request.SerializeToString()


PROTOBUF = {"Content-Type": "application/x-protobuf"}
