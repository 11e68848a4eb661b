"""The server's control plane: who owns what, requests and their answers, long-polls.

`Service` sits between the HTTP routes and the engine. It files every session, sampler,
request and checkpoint under the API key (owner) that made it, and answers anything of another
owner as not found. Work handed to the engine becomes a request: its engine future, once done,
is turned into its answer envelope by ONE writer thread, which commits finished answers to the
database in batches, keeps them in memory pre-serialised, and then wakes the long-polls
waiting for them on the event loop (no poll ever queries the database while a request runs).
A retry carrying the same idempotency key gets the first request back; finished answers are
forgotten after `retention_s`. For a protocol whose clients never resubmit a failed request
(Tinker's), the service itself retries a request that failed retryably (bios.retry, same
sequence number), and the next poll hears of that failure as its HTTP status (503, 408 or 429).
Such a request is filed with its body (`stored`) while it runs, so that after a restart
`bios.server.recovery` runs it again under the same id (`resume`), and its polls just wait.
Before a request's `record` hook writes a session's state to the journal, the answers of that
session's earlier requests are committed, so a restart finds none of them unanswered.
An observer on another thread waits for a state of the service (`wait_until`), never a while.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import sqlalchemy.exc

from bios.engine import Engine
from bios.engine.engine import WithState
from bios.errors import BiosError, ConflictError, NotFoundError
from bios.futures import settle_clock
from bios.retry import retrying
from bios.server.auth import NO_AUTH_OWNER
from bios.server.db import Records, RequestRow
from bios.server.journal import Journal
from bios.server.ledger import Bill, Entry, Ledger, Usage
from bios.server.polls import Polls
from bios.simulation import SimulationReport, Simulator
from bios.types import StateResult, TrainingInfo
from bios.validation import parse_path

R = TypeVar("R")

Recorder = Callable[[str, R, bytes], None]
"""Called by the writer thread with (request id, result, answer envelope) before the answer is
committed and published; if it raises, the request fails with that error instead."""


@dataclass(slots=True)
class _Pending(Generic[R]):
    owner: str
    session_id: str | None
    record: Recorder[R] | None
    encode: Callable[[R], bytes]
    encode_failure: Callable[[BaseException], bytes]
    entry: Entry
    """The request's ledger row as submitted: the writer fills in its end, status and usage."""
    meter: Callable[[R], Usage]


def encode_result(result: object) -> bytes:
    """The `done` envelope of `result` (a bios.types result model, or plain JSON data)."""
    payload = result.model_dump_json().encode() if hasattr(result, "model_dump_json") else json.dumps(result).encode()
    return b'{"status":"done","result":' + payload + b"}"


def encode_error(error: BaseException) -> bytes:
    """The `error` envelope of `error` (anything not a BiosError is reported as an internal error)."""
    if not isinstance(error, BiosError):
        from bios.errors import BackendError

        error = BackendError(f"internal error: {type(error).__name__}: {error}")
    return json.dumps({"status": "error", "error": error.to_dict()}).encode()


def _metered(meter: Callable[[R], Usage], result: R) -> Usage:
    """`meter(result)`, or no usage if the meter fails: an answer is never lost to its accounting."""
    try:
        return meter(result)
    except Exception:  # noqa: BLE001 - see the docstring
        return Usage()


def _entry(request_id: str, owner: str, kind: str, session_id: str | None, bill: Bill, body_bytes: int) -> Entry:
    """The ledger row of a request submitted now, still pending."""
    return Entry(
        request_id,
        owner,
        kind,
        session_id,
        bill.client_session,
        bill.base_model,
        "pending",
        time.time(),
        0.0,
        body_bytes,
        0,
    )


class Service:
    """Ownership, requests and answers on top of one engine. Thread-safe; `attach(loop)` once
    the event loop serving long-polls runs."""

    def __init__(
        self,
        engine: Engine,
        records: Records,
        journal: Journal,
        *,
        retention_s: float = 3600.0,
        simulator: Simulator | None = None,
    ) -> None:
        self.engine = engine
        self.simulator = simulator
        """The service simulator the engine runs under (`bios serve --simulation`), if any."""
        self.records = records
        self.ledger = Ledger(records.engine)
        """Every finished request's usage, per owner (`bios.server.ledger`)."""
        self.journal = journal
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._session_owner: dict[str, str] = {}
        self._session_base: dict[str, str | None] = {}  # session id → base model, read once
        self._sampler_owner: dict[str, str] = {}
        self._pending: dict[str, _Pending[Any]] = {}
        self._answers: dict[str, tuple[str, bytes, float]] = {}  # request id → (owner, envelope, finished at)
        self._notices: dict[str, list[BiosError]] = {}  # request id → failed attempts its next polls hear of
        # (owner, HTTP status) → polls answered with a failed attempt
        self.notices_served: dict[tuple[str, int], int] = {}
        self._changed = threading.Condition()
        self._polls = Polls(self._changed)
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_answers, name="bios-answers", daemon=True)
        self._writer.start()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake long-polls on `loop` from now on."""
        self._polls.attach(loop)

    def simulation_report(self) -> SimulationReport | None:
        """The simulator's report so far (writing its trace file, if any); None when not simulating."""
        return self.simulator.report() if self.simulator is not None else None

    def close(self) -> None:
        self._finished.put(None)
        self._writer.join(timeout=10)

    # ---- ownership ------------------------------------------------------------------------------

    def add_session(
        self, session_id: str, owner: str, base_model: str, user_metadata: dict[str, str] | None = None
    ) -> None:
        """Record a new session of `owner` (with its user metadata) and make its initial state durable."""
        self.records.add_session(session_id, owner, base_model, user_metadata)
        self.journal.write(session_id, self.engine.export_state(session_id).result(), -1)
        self.adopt_session(session_id, owner)

    def session_bill(self, session_id: str, meter: Callable[[R], Usage]) -> Bill[R]:
        """The `Bill` of a request of Bios session `session_id`: its base model (read from the
        records once per session, since it never changes) and `meter`."""
        with self._lock:
            known = session_id in self._session_base
            base_model = self._session_base.get(session_id)
        if not known:
            base_model = self.records.session_base_model(session_id)
            with self._lock:
                self._session_base[session_id] = base_model
        return Bill(base_model, None, meter)

    def adopt_session(self, session_id: str, owner: str) -> None:
        """Serve an already recorded session of `owner` (after a restart)."""
        with self._lock:
            self._session_owner[session_id] = owner

    def check_session(self, owner: str, session_id: object) -> str:
        """`session_id` if `owner` owns it; NotFoundError otherwise (also for another owner's)."""
        if not isinstance(session_id, str) or self._session_owner_of(session_id) != owner:
            raise NotFoundError(f"session_id: no training session {session_id!r}", field="session_id")
        return session_id

    def _session_owner_of(self, session_id: str) -> str | None:
        with self._lock:
            known = self._session_owner.get(session_id)
        return known if known is not None else self.records.session_owner(session_id)

    def close_session(self, owner: str, session_id: str) -> None:
        """End `owner`'s session: freed in the engine and no longer restored after a restart
        (its checkpoints stay)."""
        self.check_session(owner, session_id)
        self.engine.close_session(session_id)
        self.journal.delete(session_id)
        with self._lock:
            self._session_base.pop(session_id, None)
        self._announce()

    def add_sampler(
        self, sampler_id: str, owner: str, *, base_model: str | None = None, model_path: str | None = None
    ) -> None:
        """File a sampler under `owner`; given what it samples from (`base_model` or
        `model_path`), it is also recorded and served again after a restart."""
        if base_model is not None or model_path is not None:
            self.records.add_sampler(sampler_id, owner, base_model, model_path)
        with self._lock:
            self._sampler_owner[sampler_id] = owner

    def check_sampler(self, owner: str, sampler_id: str) -> str:
        with self._lock:
            if self._sampler_owner.get(sampler_id) != owner:
                raise NotFoundError(f"sampler_id: no sampling client {sampler_id!r}", field="sampler_id")
        return sampler_id

    def drop_sampler(self, owner: str, sampler_id: str) -> None:
        self.check_sampler(owner, sampler_id)
        with self._lock:
            del self._sampler_owner[sampler_id]
        self.records.remove_sampler(sampler_id)
        self.engine.release_sampler(sampler_id)

    def check_checkpoint(self, owner: str, path: str) -> str:
        """`path` if it is a checkpoint path `owner` owns; NotFoundError otherwise. Checkpoints
        that no key saved (written in-process into the same home) belong to the no-auth owner."""
        session_id, _, _ = parse_path(path)
        recorded = self.records.checkpoint_owner(path)
        if (recorded or (NO_AUTH_OWNER if self.records.session_owner(session_id) is None else None)) != owner:
            raise NotFoundError(f"path: no checkpoint at {path}", field="path")
        return path

    def readable_checkpoint(self, who: str, path: str) -> str:
        """`path` if `who` may read it (load it, sample from it): its owner's, or published;
        NotFoundError otherwise."""
        try:
            return self.check_checkpoint(who, path)
        except NotFoundError:
            if self.engine.store.record(path).public:
                return path
            raise

    def publish_checkpoint(self, owner: str, path: str, public: bool) -> StateResult:
        """Publish `owner`'s checkpoint `path` (any key may then read it) or, with `public`
        False, unpublish it; doing either twice is harmless (the tinker SDK retries a 409 until
        its progress timeout, hours later). NotFoundError if it is not `owner`'s."""
        return self.engine.publish_checkpoint(self.check_checkpoint(owner, path), public)

    def list_sessions(self, owner: str) -> list[TrainingInfo]:
        """`owner`'s open training sessions, oldest first."""
        open_now = set(self.engine.session_ids())
        return [self.engine.session_info(s) for s, *_ in self.records.sessions_of(owner) if s in open_now]

    def checkpoint_recorder(self, owner: str, session_id: str) -> Recorder[StateResult]:
        """Files the checkpoint a save_state result names under `owner`."""
        return lambda _request_id, result, _answer: self.records.add_checkpoint(result.path, owner, session_id)

    def durable_recorder(self, session_id: str, seq: int) -> Recorder[WithState[Any]]:
        """Writes the state of a `WithState` answer (of `optim_step_and_export` or
        `load_state_and_export`) to the journal, with the request and its answer."""

        def record(request_id: str, result: WithState[Any], answer: bytes) -> None:
            self.journal.write(session_id, result.state, seq, request_id, answer)
            self.records.forget_replays(session_id, seq)

        return record

    def list_checkpoints(self, owner: str, session_id: str | None = None) -> list[StateResult]:
        """The checkpoints (of session `session_id`, or of every session) that `owner` may see."""
        records = self.engine.list_checkpoints(session_id)
        mine = self.records.checkpoints_of(owner)
        if owner == NO_AUTH_OWNER:
            return [r for r in records if r.path in mine or self.records.checkpoint_owner(r.path) is None]
        return [r for r in records if r.path in mine]

    def usage(self, owner: str) -> dict[str, int]:
        """`owner`'s usage: the ledger's sums over its finished requests (`Usage`), and the
        checkpoints it holds now (`checkpoint_count`, `checkpoint_bytes` on disk)."""
        held = self.list_checkpoints(owner)
        return {
            **self.ledger.usage(owner).to_dict(),
            "checkpoint_count": len(held),
            "checkpoint_bytes": sum(c.size_bytes or 0 for c in held),
        }

    def set_checkpoint_ttl(self, owner: str, path: str, ttl_seconds: float | None) -> StateResult:
        """Make `owner`'s checkpoint `path` expire `ttl_seconds` from now (None: never)."""
        return self.engine.set_checkpoint_ttl(self.check_checkpoint(owner, path), ttl_seconds)

    def delete_checkpoint(self, owner: str, path: str) -> None:
        """Delete `owner`'s checkpoint `path` (NotFoundError if it is not `owner`'s)."""
        self.engine.delete_checkpoint(self.check_checkpoint(owner, path))
        self.records.remove_checkpoint(path)

    # ---- requests -------------------------------------------------------------------------------

    def submit(
        self,
        owner: str,
        kind: str,
        body: bytes,
        key: str | None,
        start: Callable[[], concurrent.futures.Future[R]],
        *,
        session_id: str | None = None,
        seq: int | None = None,
        record: Recorder[R] | None = None,
        replay: bytes | None = None,
        stored: bytes | None = None,
        encode: Callable[[R], bytes] = encode_result,
        encode_failure: Callable[[BaseException], bytes] = encode_error,
        retry_transient: bool = False,
        bill: Bill[R] | None = None,
    ) -> str:
        """Start `start()` as a request of `owner` and return its id; with an idempotency `key`
        seen before (same kind and body), the first request's id instead. A request the engine
        rejects at once raises that error, and so does every retry of it. The answer stored and
        served verbatim is `encode(result)` or `encode_failure(error)` (by default the JSON
        envelopes of `bios.wire`; another protocol passes its own). `replay`: for a request that
        adds a gradient, a `bios.wire.ForwardBackward` body that re-applies it after a restart.
        `stored`: the body from which a restart runs the request again (`resume`) if it is still
        pending then; kept until it finishes. `retry_transient`: retry a retryable failure here
        (see the module docstring). `bill`: what the request is accounted under in the ledger,
        and the meter of its usage (by default: nothing used, no base model or client session);
        a request that fails is entered in the ledger with no usage."""
        body_hash = hashlib.sha256(kind.encode() + b"\0" + (session_id or "").encode() + b"\0" + body).hexdigest()
        request_id = f"req-{uuid.uuid4().hex}"
        bill = bill or Bill()
        entry = _entry(request_id, owner, kind, session_id, bill, len(body))
        try:
            self.records.add_request(
                RequestRow(request_id, owner, kind, session_id, seq, key, body_hash, "pending", None, replay, stored)
            )
        except sqlalchemy.exc.IntegrityError:  # the key was used before (a retry), maybe concurrently
            earlier = self._earlier(owner, key, body_hash) if key is not None else None
            if earlier is None:
                raise
            return earlier
        pending = _Pending(owner, session_id, record, encode, encode_failure, entry, bill.meter)
        try:
            self._start(request_id, kind, start, pending, session_id, seq, retry_transient)
        except BiosError as exc:
            answer = encode_error(exc)
            ended = replace(entry, status="rejected", finished_at=time.time(), answer_bytes=len(answer))
            self.records.finish_requests([(request_id, "rejected", answer)], [ended])
            raise
        return request_id

    def resume(
        self,
        row: RequestRow,
        start: Callable[[], concurrent.futures.Future[R]],
        *,
        record: Recorder[R] | None = None,
        encode: Callable[[R], bytes] = encode_result,
        encode_failure: Callable[[BaseException], bytes] = encode_error,
        retry_transient: bool = False,
        bill: Bill[R] | None = None,
    ) -> None:
        """Run again a request filed before a restart (`row`, still pending) under its own id,
        as `submit` runs a new one: its polls wait for the answer as usual, and it is accounted
        by `bill` when it ends. A request the engine rejects at once is answered with
        `encode_failure(error)`."""
        bill = bill or Bill()
        entry = _entry(row.request_id, row.owner, row.kind, row.session_id, bill, len(row.body or b""))
        pending = _Pending(row.owner, row.session_id, record, encode, encode_failure, entry, bill.meter)
        try:
            self._start(row.request_id, row.kind, start, pending, row.session_id, row.seq, retry_transient)
        except BiosError as exc:
            self.answer_now(row, encode_failure(exc))

    def answer_now(self, row: RequestRow, envelope: bytes) -> None:
        """Answer the pending request `row` with `envelope`, which ran nowhere (an `error` one,
        or another protocol's failure); the ledger enters it as an error with no usage."""
        entry = _entry(row.request_id, row.owner, row.kind, row.session_id, Bill(), len(row.body or b""))
        ended = replace(entry, status="error", finished_at=time.time(), answer_bytes=len(envelope))
        self.records.finish_requests([(row.request_id, "error", envelope)], [ended])
        with self._lock:
            self._answers[row.request_id] = (row.owner, envelope, time.time())
        self._polls.wake([row.request_id])

    def _start(
        self,
        request_id: str,
        kind: str,
        start: Callable[[], concurrent.futures.Future[R]],
        pending: _Pending[R],
        session_id: str | None,
        seq: int | None,
        retry_transient: bool,
    ) -> None:
        """`start()` (retried, with `retry_transient`) as the filed request `request_id`, whose
        answer the writer thread commits; raises what `start()` raises at once."""
        future = self._retried(request_id, kind, start, session_id, seq) if retry_transient else start()
        with self._lock:
            self._pending[request_id] = pending
        future.add_done_callback(lambda done: self._finished.put((request_id, done)))

    def _retried(
        self,
        request_id: str,
        kind: str,
        start: Callable[[], concurrent.futures.Future[R]],
        session_id: str | None,
        seq: int | None,
    ) -> concurrent.futures.Future[R]:
        """`start()`, retried on retryable failures; each failure becomes a notice for the next poll."""

        def give_up() -> None:
            if session_id is not None and seq is not None:
                self.engine.skip(session_id, seq)

        return retrying(
            start, self.engine.clock, kind, give_up=give_up, on_retry=lambda error: self._notice(request_id, error)
        )

    def _notice(self, request_id: str, error: BiosError) -> None:
        with self._lock:
            self._notices.setdefault(request_id, []).append(error)
        self._polls.wake([request_id])

    def _earlier(self, owner: str, key: str, body_hash: str) -> str | None:
        """The id of `owner`'s request with idempotency `key`; re-raises its rejection;
        ConflictError if that key was used for a different request."""
        row = self.records.request_by_key(owner, key)
        if row is None:
            return None
        if row.body_hash != body_hash:
            raise ConflictError(
                f"idempotency key {key!r} was already used for a different request; a new request needs a new key "
                "(Idempotency-Key header, or with the Tinker protocol a new seq_id)",
                field="Idempotency-Key",
            )
        if row.status == "rejected" and row.answer is not None:
            raise BiosError.from_dict(json.loads(row.answer)["error"])
        return row.request_id

    def answer(self, owner: str, request_id: str) -> bytes | None:
        """The answer envelope of `owner`'s request, None while it runs; NotFoundError if unknown."""
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is not None:
                if pending.owner != owner:
                    raise NotFoundError(f"request_id: no request {request_id!r}", field="request_id")
                return None
            done = self._answers.get(request_id)
        if done is None:
            row = self.records.request(request_id)
            if row is not None and row.status in ("done", "error") and row.answer is not None:
                done = (row.owner, row.answer, time.time())
        if done is None or done[0] != owner:
            raise NotFoundError(f"request_id: no request {request_id!r}", field="request_id")
        return done[1]

    async def wait(self, owner: str, request_id: str, timeout: float) -> bytes | None:
        """`answer`, waiting up to `timeout` seconds for it on the event loop. A request the
        service retried (`retry_transient`): each failed attempt is raised to one poll first."""
        found = self.answer(owner, request_id)
        self._raise_notice(owner, request_id)
        if found is not None or timeout <= 0:
            return found
        await self._polls.wait(request_id, timeout)
        found = self.answer(owner, request_id)
        self._raise_notice(owner, request_id)
        return found

    def retried_attempts(self, owner: str | None) -> dict[str, int]:
        """How many polls of `owner`'s requests (everyone's for None) were answered with a
        failed attempt the service retried, by HTTP status."""
        counts: dict[str, int] = {}
        with self._lock:
            for (whose, status), n in sorted(self.notices_served.items(), key=lambda item: item[0][1]):
                if owner is None or whose == owner:
                    counts[str(status)] = counts.get(str(status), 0) + n
        return counts

    def _raise_notice(self, owner: str, request_id: str) -> None:
        with self._lock:
            waiting = self._notices.get(request_id)
            notice = waiting.pop(0) if waiting else None
            if waiting is not None and not waiting:
                del self._notices[request_id]
            if notice is not None:
                served = (owner, notice.status)
                self.notices_served[served] = self.notices_served.get(served, 0) + 1
        if notice is not None:
            raise notice

    def _write_answers(self) -> None:
        """The writer thread: finished engine futures → envelopes → database → memory → wake-ups.
        Answers of a session finished before one of its requests with a `record` hook (a journal
        write) are committed before that hook runs, so a restart never finds a request that came
        before the journal's state still unanswered."""
        while True:
            batch = [self._finished.get()]
            while not self._finished.empty() and len(batch) < 256:
                batch.append(self._finished.get())
            answers: list[tuple[str, str, bytes, str, Entry]] = []
            sessions: set[str | None] = set()  # of the answers collected and not yet committed
            for request_id, done in filter(None, batch):
                with self._lock:
                    pending = self._pending[request_id]
                settle_clock(done)  # a simulated clock moves on as answers are given
                error = done.exception()
                envelope = pending.encode_failure(error) if error is not None else pending.encode(done.result())
                if error is None and pending.record is not None:
                    if pending.session_id in sessions:
                        self._publish(answers)
                        answers, sessions = [], set()
                    try:
                        pending.record(request_id, done.result(), envelope)
                    except Exception as exc:  # noqa: BLE001 - the request fails with it
                        error = exc
                        envelope = pending.encode_failure(exc)
                status = "error" if error is not None else "done"
                usage = _metered(pending.meter, done.result()) if error is None else Usage()
                entry = replace(
                    pending.entry, status=status, finished_at=time.time(), answer_bytes=len(envelope), usage=usage
                )
                answers.append((request_id, status, envelope, pending.owner, entry))
                sessions.add(pending.session_id)
            self._publish(answers)
            if None in batch:
                return

    def _publish(self, answers: list[tuple[str, str, bytes, str, Entry]]) -> None:
        """Commit (request id, status, envelope, owner, ledger entry) answers with their ledger
        entries, keep them in memory, wake their polls."""
        if not answers:
            return
        self.records.finish_requests(
            [(rid, status, envelope) for rid, status, envelope, _, _ in answers], [entry for *_, entry in answers]
        )
        now = time.time()
        with self._lock:
            for rid, _, envelope, owner, _ in answers:
                self._answers[rid] = (owner, envelope, now)
                del self._pending[rid]
        self._polls.wake([rid for rid, *_ in answers])
        self._announce()

    # ---- observing --------------------------------------------------------------------------------

    def waiting_polls(self, request_id: str | None = None) -> int:
        """How many long-polls are waiting now for `request_id`'s answer (for any answer if None)."""
        return self._polls.waiting(request_id)

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Block until `condition()` is true, re-checking it whenever a session closes, answers
        are published, or a long-poll starts or stops waiting; False if `timeout` seconds pass
        first. For observers on other threads (tests, monitoring); never on the event loop."""
        with self._changed:
            return self._changed.wait_for(condition, timeout)

    def _announce(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def prune(self, now: float | None = None) -> int:
        """Forget answers finished more than `retention_s` ago (memory and database)."""
        cutoff = (time.time() if now is None else now) - self.retention_s
        with self._lock:
            for request_id in [rid for rid, (_, _, at) in self._answers.items() if at < cutoff]:
                del self._answers[request_id]
                self._notices.pop(request_id, None)
        return self.records.prune_requests(cutoff)
