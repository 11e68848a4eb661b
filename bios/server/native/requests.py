"""The answers of requests: `GET /v1/requests/{id}`, long-polled on the event loop, and the
answer to a work request itself (`submitted`): its id, followed in the same response by its
envelope when the client asked for it streamed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from bios import wire
from bios.errors import NotFoundError
from bios.server.service import Service
from bios.server.state import OwnerDep, ServiceDep, Submission

router = APIRouter()

JSON = "application/json"


@router.get("/v1/requests/{request_id}")
async def request_answer(
    request_id: str, who: OwnerDep, service: ServiceDep, wait: float = Query(0.0, ge=0.0)
) -> Response:
    """The request's answer envelope; 408 while it is still running after `wait` seconds."""
    found = await service.wait(who, request_id, min(wait, wire.MAX_WAIT_S))
    if found is not None and not found.startswith(b"{"):  # a request of the Tinker protocol, answered there
        raise NotFoundError(f"request_id: no request {request_id!r}", field="request_id")
    if found is None:
        return JSONResponse({"status": "pending", "request_id": request_id}, status_code=408)
    return Response(found, media_type=JSON)


def submitted(service: Service, who: str, request_id: str, how: Submission) -> Response:
    """The answer to `who`'s work request `request_id`: `Submitted` JSON; streamed (`how.stream`),
    that line and then, once the work is done within `wire.MAX_WAIT_S`, its envelope line (the
    stream ends after the first line otherwise, and the client polls)."""
    head = wire.Submitted(request_id=request_id).model_dump_json().encode()
    if not how.stream:
        return Response(head, media_type=JSON)

    return _StreamedAnswer(head, lambda: service.wait(who, request_id, wire.MAX_WAIT_S))


class _StreamedAnswer(Response):
    """`head` as the first line at once, then the line `answer()` gives (nothing if it gives
    None), then the end of the body. Sent straight to the ASGI server: unlike starlette's
    StreamingResponse, no task group watches for a disconnect meanwhile (the wait is bounded,
    and a server drops what is sent to a client that went away)."""

    media_type = wire.STREAM_MEDIA_TYPE

    def __init__(self, head: bytes, answer: Callable[[], Awaitable[bytes | None]]) -> None:
        self.status_code, self.background = 200, None
        self.init_headers()  # without a body: no Content-Length, the body is chunked
        self._head, self._answer = head, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self._head + b"\n", "more_body": True})
        found = await self._answer()
        await send({"type": "http.response.body", "body": b"" if found is None else found + b"\n"})
