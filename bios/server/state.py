"""What the native `/v1` routes of one app share, and the FastAPI dependencies that hand it out.

`create_app` files one `ServerState` on its app (`attach`); the route handlers are module-level
functions that receive the service and the caller's owner id through the dependencies below,
never through closures. Every dependency is a coroutine, so resolving it runs on the event
loop and never waits for a worker thread behind slow synchronous routes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Header
from starlette.requests import HTTPConnection

from bios.server.auth import KeyRing, bearer
from bios.server.service import Service
from bios.server.signing import DownloadSigner


@dataclass(frozen=True, slots=True)
class ServerState:
    """One app's service (and through it the engine), the keys it accepts, how often it
    forgets old answers (seconds) and the signer of its download URLs."""

    service: Service
    keys: KeyRing
    prune_every_s: float
    signer: DownloadSigner = field(default_factory=DownloadSigner)


def attach(app: FastAPI, state: ServerState) -> None:
    """File `state` on `app` for `server_state`."""
    app.state.bios = state


def state_of(app: FastAPI) -> ServerState:
    """The `ServerState` filed on `app` by `attach`."""
    return app.state.bios


def server_state(connection: HTTPConnection) -> ServerState:
    """The `ServerState` of the app serving `connection`."""
    return state_of(connection.app)


async def current_service(connection: HTTPConnection) -> Service:
    """FastAPI dependency: the app's `Service`."""
    return server_state(connection).service


async def current_state(connection: HTTPConnection) -> ServerState:
    """FastAPI dependency: the app's `ServerState`."""
    return server_state(connection)


async def current_keys(connection: HTTPConnection) -> KeyRing:
    """FastAPI dependency: the keys the app accepts."""
    return server_state(connection).keys


async def owner(connection: HTTPConnection, authorization: str | None = Header(None)) -> str:
    """FastAPI dependency: the owner id of the `Authorization: Bearer KEY` header;
    AuthenticationError when the key is missing or unknown."""
    return server_state(connection).keys.authenticate(bearer(authorization))


@dataclass(frozen=True, slots=True)
class Submission:
    """How a work request was sent: its `Idempotency-Key` header (`key`, None if not sent), and
    whether it asked for its answer streamed after the request id (`wire.STREAM_ANSWER_HEADER`)."""

    key: str | None
    stream: bool


async def submission(
    idempotency_key: str | None = Header(None), bios_stream_answer: str | None = Header(None)
) -> Submission:
    """FastAPI dependency: the `Submission` of a work request, read from its headers."""
    return Submission(idempotency_key, bios_stream_answer == "1")


ServiceDep = Annotated[Service, Depends(current_service)]
ServerStateDep = Annotated[ServerState, Depends(current_state)]
KeysDep = Annotated[KeyRing, Depends(current_keys)]
OwnerDep = Annotated[str, Depends(owner)]
SubmissionDep = Annotated[Submission, Depends(submission)]
