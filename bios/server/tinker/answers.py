"""How the answers of Tinker requests are stored by `Service` and served by `retrieve_future`.

`Service.submit(..., encode=, encode_failure=)` stores each answer as bytes, ready to serve.
A Tinker answer is one tag byte and the body: `P` + a serialised protobuf message (the
`ForwardBackwardOutput` / `SampleResponse` results the SDK accepts only as protobuf), `J` +
JSON (every other result, and failures as `{"error", "category"}`) or `G` + JSON (a request a
restart interrupted and that the client must submit anew: served with HTTP 410, on which the
SDK's sampling client resubmits its sample). Bios's own envelopes start with `{`, so an answer
of the native API is never mistaken for a Tinker one; a Bios error envelope is served as a
Tinker failure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

from fastapi.responses import Response

from bios.errors import BiosError, NotFoundError

R = TypeVar("R")

PROTO, JSON, GONE = b"P", b"J", b"G"
PROTO_MEDIA_TYPE = "application/x-protobuf"


def proto_answer(serialise: Callable[[R], bytes]) -> Callable[[R], bytes]:
    """An `encode` storing `serialise(result)` (protobuf bytes)."""
    return lambda result: PROTO + serialise(result)


def json_answer(to_json: Callable[[R], dict]) -> Callable[[R], bytes]:
    """An `encode` storing `to_json(result)` as JSON."""
    return lambda result: JSON + json.dumps(to_json(result)).encode()


def failure(error: BaseException) -> bytes:
    """The stored failure: `{"error": message, "category"}`, category "user" for a request the
    caller got wrong (4xx) and "server" for anything else."""
    if isinstance(error, BiosError):
        message, category = error.message, "user" if 400 <= error.status < 500 else "server"
    else:
        message, category = f"internal error: {type(error).__name__}: {error}", "server"
    return JSON + json.dumps({"error": message, "category": category}).encode()


def gone(message: str) -> bytes:
    """The stored answer of a request to submit anew: served as HTTP 410 with `{"error": message}`."""
    return GONE + json.dumps({"error": message, "category": "server"}).encode()


def served(request_id: str, stored: bytes) -> Response:
    """The HTTP answer to a poll that found `stored`. A Bios error envelope is served as a
    Tinker failure; any other native Bios answer is NotFoundError."""
    tag, body = stored[:1], stored[1:]
    if tag == PROTO:
        return Response(body, media_type=PROTO_MEDIA_TYPE)
    if tag in (JSON, GONE):
        return Response(body, media_type="application/json", status_code=410 if tag == GONE else 200)
    envelope = json.loads(stored) if tag == b"{" else {}
    if envelope.get("status") == "error":
        return Response(failure(BiosError.from_dict(envelope["error"]))[1:], media_type="application/json")
    raise NotFoundError(f"request_id: no Tinker request {request_id!r}", field="request_id")
