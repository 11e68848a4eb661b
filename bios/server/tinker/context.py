"""What the Tinker routes share: the service, keys, runs, sessions, and request submission.

`install` files one `Tinker` on the app; the route handlers are module-level functions that
receive it and the caller's owner id through the FastAPI dependencies below (coroutines, so
they never wait for a worker thread). `RunRequest` is one request of a training run at its
Tinker `seq_id`.

A route turns its body into a `Plan` (what the request starts, its key, run and sequence
number, how its answer is kept) with a planner registered here under its kind (`resumable`),
and submits the plan with the body. After a restart, `Tinker.resume` gives a request that was
still pending the same planner and its stored body, so it runs again through the same code,
under its own request id and at its own sequence number.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, FastAPI, Header
from starlette.requests import HTTPConnection

from bios.errors import BiosError, NotFoundError
from bios.server import ledger
from bios.server.auth import KeyRing
from bios.server.db import RequestRow
from bios.server.ledger import Bill, Usage
from bios.server.service import Recorder, Service
from bios.server.signing import DownloadSigner
from bios.server.tinker import answers, ids
from bios.server.tinker.ids import Run, Runs, session_of
from bios.server.tinker.sessions import Releases, Sessions
from bios.types import TrainingInfo

T = TypeVar("T")
R = TypeVar("R")
B = TypeVar("B")

GONE = "the server restarted before this request finished; nothing of it was applied"


@dataclass(frozen=True, slots=True)
class Plan(Generic[R]):
    """A Tinker request of `who`, parsed: `start()` submits its work to the engine (at engine
    sequence number `seq` of `run`'s Bios session, if it has one), `encode` stores its answer,
    `record` and `replay` are the service's hooks that keep a run's training across a restart.
    `hashed` is what its idempotency `key` covers (a retry with another body is a 409);
    `model_id`, the run it answers with (None for a sample); `bill`, what the ledger accounts
    it under (nothing used by default)."""

    who: str
    kind: str
    hashed: bytes
    key: str | None
    start: Callable[[], concurrent.futures.Future[R]]
    encode: Callable[[R], bytes]
    run: Run | None = None
    seq: int | None = None
    record: Recorder | None = None
    replay: bytes | None = None
    model_id: str | None = None
    bill: Bill | None = None


Planner = Callable[["Tinker", str, bytes], Plan[Any]]
"""(tinker, owner, stored body) → the request's plan; raises the BiosError that refuses it."""

PLANNERS: dict[str, Planner] = {}
"""The planners of the Tinker requests a restart runs again, by kind (`resumable`)."""


def resumable(
    parse: Callable[[bytes], B], *kinds: str
) -> Callable[[Callable[[Tinker, str, B], Plan[Any]]], Callable[[Tinker, str, B], Plan[Any]]]:
    """Register a planner `(tinker, owner, body) -> Plan` for requests `kinds`, whose stored
    body `parse` reads back; returns the planner unchanged."""

    def register(plan: Callable[[Tinker, str, B], Plan[Any]]) -> Callable[[Tinker, str, B], Plan[Any]]:
        for kind in kinds:
            PLANNERS[kind] = lambda tinker, who, stored: plan(tinker, who, parse(stored))
        return plan

    return register


class Tinker:
    """The Tinker side of one `Service`: model ids filed in its database, sessions in memory."""

    def __init__(self, service: Service, keys: KeyRing, signer: DownloadSigner) -> None:
        self.service = service
        self.engine = service.engine
        self.keys = keys
        self.runs = Runs(service.records.engine)
        self.sessions = Sessions(
            Releases(sampler=service.drop_sampler, run=service.close_session, runs_of=self._bios_sessions_of)
        )
        self.home = service.engine.store.root.parent
        self.signer = signer
        self._chain = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="bios-tinker")

    def _bios_sessions_of(self, owner: str, session_id: str) -> list[str]:
        """The Bios sessions training the runs `owner`'s Tinker session `session_id` created."""
        return [run.session_id for run in self.runs.of_tinker_session(owner, session_id)]

    def readable_path(self, who: str, tinker_path: object) -> str:
        """The Bios path of checkpoint `tinker_path` if `who` may read it (load it, sample from
        it): its own or a published one; NotFoundError naming `path` otherwise."""
        try:
            return self.service.readable_checkpoint(who, self.runs.anyones_bios_path(tinker_path))
        except NotFoundError:
            raise NotFoundError(f"path: no checkpoint at {tinker_path}", field="path") from None

    def session_ids(self, owner: str) -> list[str]:
        """`owner`'s Tinker sessions, oldest first: those in memory and, after a restart, those
        known by the runs they created."""
        created = self.sessions.remembered(owner)
        runs, _ = self.runs.page(owner, 1 << 30, 0)
        for run in runs:
            created.setdefault(session_of(run.model_id), run.created_at)
        return sorted(created, key=lambda session_id: (created[session_id], session_id))

    def submit(self, plan: Plan[R], stored: bytes | None) -> str:
        """`Service.submit` of `plan`: answers stored in the Tinker encoding, the idempotency
        key (a retry with the same key and body gets the first request, another body a 409),
        filed under its run's Bios session at its sequence number, accounted in the ledger by
        its bill. With `stored` (the body its planner reads back), a restart runs it again if
        it is still pending then. The SDK never resubmits a failed request, so the service
        retries retryable failures."""
        return self.service.submit(
            plan.who,
            f"tinker.{plan.kind}",
            plan.hashed,
            plan.key,
            plan.start,
            session_id=plan.run.session_id if plan.run else None,
            seq=plan.seq,
            record=plan.record,
            replay=plan.replay,
            stored=stored,
            encode=plan.encode,
            encode_failure=answers.failure,
            retry_transient=True,
            bill=plan.bill,
        )

    def accept(self, plan: Plan[R], stored: bytes) -> dict:
        """`submit` a request that makes or uses a run: the SDK's answer `{"request_id", "model_id"}`."""
        return {"request_id": self.submit(plan, stored), "model_id": plan.model_id}

    def resume(self, row: RequestRow) -> bool:
        """Run again `row`, a Tinker request still pending when the server stopped, from its
        stored body through its kind's planner, under its own id (a request that makes a run
        first makes its Tinker session known again). A sample, which is not run again, is
        answered 410, and the SDK's sampling client submits it anew; a request that no longer
        plans (its run is gone) is answered with that error. One not run again gives up its
        sequence number. Whether it runs again."""
        planner = PLANNERS.get(row.kind.removeprefix("tinker."))
        if planner is None or row.body is None:
            self._give_up(row)
            self.service.answer_now(row, answers.gone(GONE))
            return False
        try:
            plan = planner(self, row.owner, row.body)
        except BiosError as exc:
            self._give_up(row)
            self.service.answer_now(row, answers.failure(exc))
            return False
        if plan.run is None and plan.model_id is not None:
            self.sessions.adopt(row.owner, session_of(plan.model_id))
        self.service.resume(
            row,
            plan.start,
            record=plan.record,
            encode=plan.encode,
            encode_failure=answers.failure,
            retry_transient=True,
            bill=plan.bill,
        )
        return True

    def _give_up(self, row: RequestRow) -> None:
        """Release `row`'s sequence number, if its session is still served."""
        if row.session_id is not None and row.seq is not None:
            try:
                self.engine.skip(row.session_id, row.seq)
            except NotFoundError:
                pass

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

    def new_run(self, who: str, model_id: str, create: Callable[[], TrainingInfo], metadata: dict[str, str]) -> str:
        """`model_id`, filed as `who`'s Tinker run on a new Bios session `create()`, held by its
        Tinker session (NotFoundError or SessionExpiredError for a session not live). A run
        filed already (by this request, before a restart) is answered as it is."""
        self.sessions.check(who, session_of(model_id))
        if self.runs.find(who, model_id) is not None:
            return model_id
        info = create()
        self.service.add_session(info.session_id, who, info.base_model)
        run = Run(model_id, info.session_id, who, info.base_model, info.lora_config.rank, metadata)
        self.runs.add(run)
        try:
            self.sessions.add_run(who, session_of(model_id), info.session_id)
        except BiosError:  # the Tinker session ended meanwhile: so does the run
            self.service.close_session(who, info.session_id)
            raise
        return model_id


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

    def plan(
        self,
        kind: str,
        hashed: bytes,
        start: Callable[[], concurrent.futures.Future[R]],
        encode: Callable[[R], bytes],
        *,
        record: Recorder | None = None,
        replay: bytes | None = None,
        meter: Callable[[R], Usage] = ledger.nothing,
    ) -> Plan[R]:
        """The plan of this request: `start` at `seq` of the run under `key`, accounted to the
        run's Tinker session and base model by `meter`."""
        bill = Bill(self.run.base_model, session_of(self.run.model_id), meter)
        return Plan(
            self.who, kind, hashed, self.key, start, encode, self.run, self.seq, record, replay, self.run.model_id, bill
        )


def done(value: T) -> concurrent.futures.Future[T]:
    """A future already resolved with `value`."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return future
