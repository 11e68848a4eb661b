"""The FastAPI application of `bios serve`: routers, error answers, limits and the pruner.

The routes live in `bios.server.native` (Bios's own `/v1` protocol, see `bios.wire`) and
`bios.server.tinker` (the official Tinker SDK's `/api/v1` protocol). Synchronous routes run in
FastAPI's thread pool and call the engine; long-polls are coroutines on the event loop, so
thousands of waiting clients hold no thread. Every error is a `BiosError` answered with its
status and `{"error": {...}}`; request bodies over `max_body_bytes` get 413 (`Admission`). The OpenAPI
schema is at /openapi.json (and browsable at /docs).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from bios import wire
from bios.clock import attempt
from bios.errors import BiosError, InvalidRequestError, NotFoundError, RequestTooLargeError
from bios.server import downloads, native, tinker
from bios.server.auth import KeyRing
from bios.server.service import Service
from bios.server.state import ServerState, attach, state_of


def create_app(
    service: Service, keys: KeyRing, *, max_body_bytes: int = 64 << 20, prune_every_s: float = 60.0
) -> FastAPI:
    """The application serving `service` to the holders of `keys`."""
    app = FastAPI(title="Bios", version="1", lifespan=_lifespan)
    attach(app, ServerState(service, keys, prune_every_s))
    app.add_middleware(Admission, max_body_bytes=max_body_bytes)
    app.exception_handler(BiosError)(_bios_error)
    app.exception_handler(RequestValidationError)(_invalid_body)
    app.exception_handler(StarletteHTTPException)(_no_route)
    app.include_router(native.router)
    app.include_router(downloads.router)  # signed URLs: no API key
    tinker.install(app, service, keys)  # the official Tinker SDK's /api/v1 protocol
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the app serves: long-polls are woken on its event loop, and old answers are
    forgotten every `prune_every_s` seconds."""
    state = state_of(app)
    state.service.attach(asyncio.get_running_loop())

    async def prune() -> None:
        while True:
            await asyncio.sleep(state.prune_every_s)
            await asyncio.to_thread(state.service.prune)

    pruner = asyncio.create_task(prune())
    try:
        yield
    finally:
        pruner.cancel()


async def _bios_error(_request: Request, exc: BiosError) -> JSONResponse:
    """A BiosError's status and `{"error": {...}}`; `Retry-After` when it says when to retry."""
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)


async def _invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 with the InvalidRequestError naming the first invalid field (`data[0].loss_fn_inputs`)."""
    first = exc.errors()[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.get("loc", ())[1:]).lstrip(".")
    error = InvalidRequestError(f"{where or 'body'}: {first.get('msg', 'invalid value')}", field=where or "body")
    return JSONResponse({"error": error.to_dict()}, status_code=400)


async def _no_route(request: Request, exc: StarletteHTTPException) -> Response:
    """A path no route serves (a path parameter spelled with `/` or `..` included) is a 404
    NotFoundError naming the path; other HTTP errors are answered as FastAPI does."""
    if exc.status_code != 404:
        return await http_exception_handler(request, exc)
    error = NotFoundError(f"path: nothing is served at {request.url.path!r}", field="path")
    return JSONResponse({"error": error.to_dict()}, status_code=404)


class Admission:
    """ASGI middleware in front of every route (plain ASGI: no task or stream per request).
    A request whose Content-Length exceeds `max_body_bytes` is answered 413 unread. A request
    carrying `Bios-Attempt: n` (a client's n-th try of one request) submits its work as attempt
    n (`bios.clock.attempt`), so that a simulating backend draws that try's faults, not the
    first try's again."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            error = RequestTooLargeError(
                f"body: {int(length)} bytes exceed this server's limit of {self.max_body_bytes} bytes; "
                "send smaller batches",
                field="body",
            )
            await JSONResponse({"error": error.to_dict()}, status_code=413)(scope, receive, send)
            return
        raw = headers.get(_ATTEMPT)
        number = int(raw) if raw is not None and raw.isdigit() and int(raw) >= 1 else None
        if number is None:
            await self.app(scope, receive, send)
            return
        with attempt(number, None):
            await self.app(scope, receive, send)


_ATTEMPT = wire.ATTEMPT_HEADER.lower().encode()
