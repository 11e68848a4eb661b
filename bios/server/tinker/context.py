"""What the Tinker routes share: the service, keys, runs, sessions, and request submission.

`install` files one `Tinker` on the app; the route handlers are module-level functions that
receive it and the caller's owner id through the FastAPI dependencies below (coroutines, so
they never wait for a worker thread). `RunRequest` is one request of a training run at its
Tinker `seq_id`.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Header
from starlette.requests import HTTPConnection

from bios.errors import BiosError
from bios.server import ledger
from bios.server.auth import KeyRing
from bios.server.ledger import Bill, Usage
from bios.server.service import Recorder, Service
from bios.server.tinker import answers, ids
from bios.server.tinker.archive import ArchiveSigner
from bios.server.tinker.ids import Run, Runs, session_of
from bios.server.tinker.sessions import Releases, Sessions
from bios.types import TrainingInfo

T = TypeVar("T")
R = TypeVar("R")


class Tinker:
    """The Tinker side of one `Service`: model ids filed in its database, sessions in memory."""

    def __init__(self, service: Service, keys: KeyRing) -> None:
        self.service = service
        self.engine = service.engine
        self.keys = keys
        self.runs = Runs(service.records.engine)
        self.sessions = Sessions(
            Releases(sampler=service.drop_sampler, run=service.close_session, runs_of=self.runs.of_tinker_session)
        )
        self.home = service.engine.store.root.parent
        self.signer = ArchiveSigner()
        self._chain = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="bios-tinker")

    def submit(
        self,
        who: str,
        kind: str,
        body: bytes,
        key: str | None,
        start: Callable[[], concurrent.futures.Future[R]],
        encode: Callable[[R], bytes],
        *,
        run: Run | None = None,
        seq: int | None = None,
        record: Recorder | None = None,
        replay: bytes | None = None,
        bill: Bill[R] | None = None,
    ) -> str:
        """`Service.submit` of a Tinker request: answers stored in the Tinker encoding, the
        idempotency `key` (a retry with the same key and body gets the first request, another
        body a 409), filed under `run`'s Bios session at engine sequence number `seq`, with the
        service's `record` and `replay` hooks that keep a session's training across a restart,
        and accounted in the ledger by `bill` (the Tinker session and base model, and the meter).
        The SDK never resubmits a failed request, so the service retries retryable failures."""
        return self.service.submit(
            who,
            f"tinker.{kind}",
            body,
            key,
            start,
            session_id=run.session_id if run else None,
            seq=seq,
            record=record,
            replay=replay,
            encode=encode,
            encode_failure=answers.failure,
            retry_transient=True,
            bill=bill,
        )

    def then(self, future: concurrent.futures.Future[R], step: Callable[[R], T]) -> concurrent.futures.Future[T]:
        """A future of `step(result of future)`, run off the engine's worker thread (so `step`
        may call the engine); a failure of `future` passes through."""
        out: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run_step(done: concurrent.futures.Future[R]) -> None:
            try:
                out.set_result(step(done.result()))
            except BaseException as exc:  # noqa: BLE001 - the request fails with it
                out.set_exception(exc)

        future.add_done_callback(lambda done: self._chain.submit(run_step, done))
        return out

    def open_run(self, who: str, model_id: str, info: TrainingInfo, metadata: dict[str, str]) -> Run:
        """File a new Bios session `info` as `who`'s Tinker run `model_id`, held by its Tinker session."""
        self.service.add_session(info.session_id, who, info.base_model)
        run = Run(model_id, info.session_id, who, info.base_model, info.lora_config.rank, metadata)
        self.runs.add(run)
        try:
            self.sessions.add_run(who, session_of(model_id), info.session_id)
        except BiosError:  # the Tinker session ended meanwhile: so does the run
            self.service.close_session(who, info.session_id)
            raise
        return run


def install_on(app: FastAPI, tinker: Tinker) -> None:
    """File `tinker` on `app` for the dependencies below."""
    app.state.tinker = tinker


async def current_tinker(connection: HTTPConnection) -> Tinker:
    """FastAPI dependency: the app's `Tinker` (filed by `install_on`)."""
    return connection.app.state.tinker


async def tinker_owner(connection: HTTPConnection, x_api_key: str | None = Header(None)) -> str:
    """FastAPI dependency: the owner id of the `X-API-Key` header (AuthenticationError if invalid)."""
    return (await current_tinker(connection)).keys.authenticate(x_api_key)


TinkerDep = Annotated[Tinker, Depends(current_tinker)]
TinkerOwnerDep = Annotated[str, Depends(tinker_owner)]


@dataclass(frozen=True, slots=True)
class RunRequest:
    """A request of `who`'s training run `run` with Tinker `seq_id`: it runs at engine sequence
    number `seq` (= seq_id - 1) of the run's Bios session, and `(model_id, seq_id)` is its
    idempotency key."""

    tinker: Tinker
    who: str
    run: Run
    seq_id: int
    seq: int

    @classmethod
    def of(cls, tinker: Tinker, who: str, model_id: str, seq_id: int | None) -> RunRequest:
        """NotFoundError unless `model_id` is `who`'s run; then InvalidRequestError for a `seq_id` below 1."""
        run = tinker.runs.get(who, model_id)
        seq = ids.engine_seq(seq_id)
        return cls(tinker, who, run, seq + 1, seq)

    @property
    def session_id(self) -> str:
        """The run's Bios session."""
        return self.run.session_id

    @property
    def key(self) -> str:
        """The idempotency key: a retry of the same request gets the first one back."""
        return f"tinker/{self.run.model_id}/{self.seq_id}"

    def ordered(self, prepare: Callable[[], T]) -> T:
        """`prepare()`, giving up the engine sequence number `seq` if it raises, so that a
        refused request does not hold the run's later requests."""
        try:
            return prepare()
        except BiosError:
            self.tinker.engine.skip(self.session_id, self.seq)
            raise

    def submit(
        self,
        kind: str,
        body: bytes,
        start: Callable[[], concurrent.futures.Future[R]],
        encode: Callable[[R], bytes],
        *,
        record: Recorder | None = None,
        replay: bytes | None = None,
        meter: Callable[[R], Usage] = ledger.nothing,
    ) -> dict:
        """`Tinker.submit` at `seq` under `key`, accounted to the run's Tinker session and base
        model by `meter`; the SDK's answer `{"request_id", "model_id"}`."""
        bill = Bill(self.run.base_model, session_of(self.run.model_id), meter)
        request_id = self.tinker.submit(
            self.who,
            kind,
            body,
            self.key,
            start,
            encode,
            run=self.run,
            seq=self.seq,
            record=record,
            replay=replay,
            bill=bill,
        )
        return {"request_id": request_id, "model_id": self.run.model_id}


def done(value: T) -> concurrent.futures.Future[T]:
    """A future already resolved with `value`."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return future
