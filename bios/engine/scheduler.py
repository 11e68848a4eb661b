"""The scheduler: per-session ordered lanes, batching across sessions, one worker thread.

Invariant (enforced here and nowhere else): the jobs of one lane run strictly in the order of
their sequence numbers 0, 1, 2, ..., one at a time, each only after the previous one has
finished; a missing number holds its lane until it is submitted or skipped. Jobs outside any
lane (sampling from frozen snapshots, the engine's own calls) have no order.

Each round the worker takes the head of every ready lane and every unordered job, groups the
backend work by (kind, base model) and makes ONE backend call per group, so concurrent
sessions on the same base model share device calls. Only the worker thread touches the
backend. With an `inline` hook there is no worker: the submitting thread runs every ready
round itself, so jobs run in submission order.

Every job passes the engine's `RequestHook` (bios.admission) twice: when it is submitted and
when it has run. A job that failed retryably having changed nothing leaves its sequence number
open: the lane waits for it to be submitted again, or skipped.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, cast

from bios.admission import DIRECT, BackendWork, Kind, Outcome, Request, RequestHook
from bios.backend import Backend, ForwardBackwardWork, OptimStepWork, ResultCallback, SampleWork
from bios.errors import BackendError, BiosError, ConflictError, NotFoundError

BatchedKind = Literal["forward_backward", "optim_step", "sample"]


@dataclass(frozen=True, slots=True)
class Batched:
    """Backend work: it joins the round's one call of `kind` on `base_model`."""

    kind: BatchedKind
    base_model: str
    item: BackendWork


@dataclass(frozen=True, slots=True)
class Call:
    """`fn()` run alone on the worker thread (adapters, checkpoints: what touches the backend
    outside its batched methods)."""

    fn: Callable[[], object]


Work = Batched | Call
R = TypeVar("R")


def _unchanged(output: Any) -> Any:
    """The identity: a job without `finish` resolves with what its backend call or function returned."""
    return output


@dataclass(slots=True)
class Job(Generic[R]):
    """One unit of work; `finish` maps the backend's output (or the call's return) to the result."""

    work: Work
    finish: Callable[[Any], R] = _unchanged
    future: concurrent.futures.Future[R] = field(default_factory=concurrent.futures.Future)
    source: str | None = None
    """Who submitted an unordered job (a sampler id), for the hook; an ordered job's is its lane."""
    lane: str | None = None
    seq: int | None = None

    @property
    def kind(self) -> Kind:
        return self.work.kind if isinstance(self.work, Batched) else "call"

    def request(self) -> Request:
        """How the hook sees this job."""
        item = self.work.item if isinstance(self.work, Batched) else None
        return Request(lane=self.source if self.lane is None else self.lane, seq=self.seq, kind=self.kind, work=item)


@dataclass(slots=True)
class _Lane:
    next_seq: int = 0
    pending: dict[int, Job[Any] | None] = field(default_factory=dict)
    """seq → its job, or None for a number skipped (used by nothing)."""


class Scheduler:
    """Queues jobs and runs them on the backend from a single worker thread (none if `hook.inline`)."""

    def __init__(self, backend: Backend, hook: RequestHook = DIRECT, *, inline: bool | None = None) -> None:
        self.backend = backend
        self.hook = hook
        self.backend_calls = 0
        self.jobs_run = 0
        self.inline = hook.inline if inline is None else inline
        self._lanes: dict[str, _Lane] = {}
        self._unordered: list[Job[Any]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._draining = False
        self._worker: threading.Thread | None = None
        if not self.inline:
            self._worker = threading.Thread(target=self._run, name="bios-engine", daemon=True)
            self._worker.start()

    # ---- lanes ----------------------------------------------------------------------------------

    def open_lane(self, lane_id: str, next_seq: int = 0) -> None:
        with self._cond:
            self._lanes[lane_id] = _Lane(next_seq=next_seq)

    def next_seq(self, lane_id: str) -> int:
        """The lowest sequence number not yet submitted or skipped in the lane."""
        with self._cond:
            lane = self._lane(lane_id)
            seq = lane.next_seq
            while seq in lane.pending:
                seq += 1
            return seq

    def skip(self, lane_id: str, seq: int) -> None:
        """Mark `seq` as used by nothing, so later jobs of the lane may run."""
        with self._cond:
            lane = self._lane(lane_id)
            if seq >= lane.next_seq and lane.pending.get(seq) is None:
                lane.pending[seq] = None
                self._cond.notify()

    def close_lane(self, lane_id: str) -> None:
        """Forget a lane; jobs still queued in it fail with NotFoundError. Unknown lanes are ignored."""
        with self._cond:
            lane = self._lanes.pop(lane_id, None)
        closed = NotFoundError(f"session {lane_id!r} was closed before this request ran", field="session_id")
        for job in lane.pending.values() if lane else ():
            if job is not None and not job.future.done():
                job.future.set_exception(closed)

    # ---- submission -----------------------------------------------------------------------------

    def submit(self, lane_id: str | None, seq: int | None, job: Job[R]) -> concurrent.futures.Future[R]:
        """Queue `job` at position `seq` of `lane_id` (unordered when lane_id is None) once the
        hook has admitted it; returns the future it resolves. Raises ConflictError for a used
        `seq`, NotFoundError for an unknown lane and whatever the hook refuses with."""
        job.lane, job.seq = lane_id, seq
        with self._cond:
            self._check_open()
            if lane_id is not None:
                self._lane(lane_id)
        admission = self.hook.admit(job.request())
        job.future = cast(concurrent.futures.Future[R], admission.future)  # the hook makes it; `finish` types it
        if admission.answered:
            if lane_id is not None and isinstance(seq, int):
                self.skip(lane_id, seq)  # a no-op when the number was used when the request first ran
            return job.future
        with self._cond:
            if lane_id is None:
                self._unordered.append(job)
            else:
                self._lane(lane_id).pending[self._free(lane_id, seq)] = job
            self._cond.notify()
        self._run_inline()
        return job.future

    def call(self, fn: Callable[[], R]) -> concurrent.futures.Future[R]:
        """Run `fn` on the worker thread, outside any lane (e.g. creating an adapter)."""
        job: Job[R] = Job(Call(fn))
        return self.submit(None, None, job)

    def close(self) -> None:
        """Stop the worker; jobs still queued fail with BackendError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._worker is not None:
            self._worker.join(timeout=60)
        closed = BackendError("the engine was shut down before this request ran")
        queued = self._unordered + [job for lane in self._lanes.values() for job in lane.pending.values() if job]
        for job in queued:
            if not job.future.done():
                job.future.set_exception(closed)

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("the engine is shut down")

    def _lane(self, lane_id: str) -> _Lane:
        try:
            return self._lanes[lane_id]
        except KeyError:
            raise NotFoundError(f"session {lane_id!r} does not exist", field="session_id") from None

    def _free(self, lane_id: str, seq: object) -> int:
        """`seq`, if it is a number of the lane not yet submitted, skipped or run; ConflictError otherwise."""
        lane = self._lane(lane_id)
        if not isinstance(seq, int) or seq < lane.next_seq or seq in lane.pending:
            raise ConflictError(
                f"seq_id {seq} of session {lane_id} is already used; the next free one is {self.next_seq(lane_id)}",
                field="seq_id",
            )
        return seq

    # ---- rounds ---------------------------------------------------------------------------------

    def _take_round(self) -> list[Job[Any]]:
        """Heads of ready lanes plus all unordered jobs; advances each lane past its head."""
        jobs, self._unordered = self._unordered, []
        for lane in self._lanes.values():
            while lane.next_seq in lane.pending and lane.pending[lane.next_seq] is None:
                del lane.pending[lane.next_seq]
                lane.next_seq += 1
            head = lane.pending.pop(lane.next_seq, None)
            if head is not None:
                jobs.append(head)
                lane.next_seq += 1
        return jobs

    def _run_inline(self) -> None:
        """Inline mode: run every ready round now, in this thread, unless a thread (maybe this
        one, from a callback) is already doing so — it will pick up what was just queued."""
        if not self.inline:
            return
        with self._cond:
            if self._draining:
                return
            self._draining = True
        try:
            while True:
                with self._cond:
                    jobs = self._take_round()
                    if not jobs:
                        self._draining = False
                        return
                self._run_round(jobs)
        except BaseException:
            with self._cond:
                self._draining = False
            raise

    def _run(self) -> None:
        while True:
            with self._cond:
                jobs = self._take_round()
                while not jobs and not self._closed:
                    self._cond.wait()
                    jobs = self._take_round()
                if self._closed and not jobs:
                    return
            self._run_round(jobs)

    def _run_round(self, jobs: list[Job[Any]]) -> None:
        self.jobs_run += len(jobs)
        groups: dict[tuple[BatchedKind, str], list[Job[Any]]] = defaultdict(list)
        for job in jobs:
            if isinstance(job.work, Batched):
                groups[(job.work.kind, job.work.base_model)].append(job)
            else:
                self._resolve(job, _called(job.work))
        for (kind, _model), group in groups.items():
            self._run_group(kind, group)

    def _run_group(self, kind: BatchedKind, group: list[Job[Any]]) -> None:
        """One backend call for `group`; each job is resolved when its output is on the host."""
        self.backend_calls += 1
        answered: set[int] = set()

        def answer(index: int, output: object) -> None:
            if index not in answered:
                answered.add(index)
                self._resolve(group[index], output)

        items = [cast(Batched, job.work).item for job in group]
        try:
            outputs = list(_backend_call(self.backend, kind, items, answer))
            if len(outputs) != len(group):
                raise BackendError(f"backend {kind} returned {len(outputs)} results for {len(group)} requests")
        except Exception as exc:  # noqa: BLE001 - a backend bug must fail its requests, not the worker
            outputs = [_as_backend_error(exc)] * len(group)
        for index, output in enumerate(outputs):
            answer(index, output)

    def _resolve(self, job: Job[Any], output: object) -> None:
        """Finish `job` with its backend `output` (or error), through the hook, and answer its future."""
        outcome = self.hook.settle(job.request(), job.future, _finished(job, output))
        if outcome.error is not None and outcome.error.retryable and not outcome.applied:
            self._reopen(job)
        try:
            if outcome.error is not None:
                job.future.set_exception(outcome.error)
            else:
                job.future.set_result(outcome.value)
        except concurrent.futures.InvalidStateError:
            pass  # the caller cancelled its future; the job ran anyway, in order, and nobody waits

    def _reopen(self, job: Job[Any]) -> None:
        """A lane job failed retryably without changing anything: its number waits for a retry."""
        if job.lane is None or job.seq is None:
            return
        with self._cond:
            lane = self._lanes.get(job.lane)
            if lane is not None and lane.next_seq == job.seq + 1:
                lane.next_seq = job.seq


def _backend_call(
    backend: Backend, kind: BatchedKind, items: list[BackendWork], answer: ResultCallback
) -> Sequence[object]:
    """The backend's batched method `kind` on `items`, which the engine built of that kind."""
    if kind == "forward_backward":
        return backend.forward_backward(cast(list[ForwardBackwardWork], items), answer)
    if kind == "optim_step":
        return backend.optim_step(cast(list[OptimStepWork], items), answer)
    return backend.sample(cast(list[SampleWork], items), answer)


def _called(call: Call) -> object:
    """`call.fn()`, or the exception it raised (which then fails its job alone)."""
    try:
        return call.fn()
    except Exception as exc:  # noqa: BLE001 - the call's failure belongs to its job's future
        return exc


def _finished(job: Job[Any], output: object) -> Outcome:
    """The outcome of `job` given its backend `output`: an error the backend reported changed
    nothing; a result passes through the job's `finish`."""
    if isinstance(output, BaseException):
        return Outcome(error=_as_backend_error(output), applied=False)
    try:
        return Outcome(value=job.finish(output))
    except Exception as exc:  # noqa: BLE001 - a failing finish fails its job alone
        return Outcome(error=_as_backend_error(exc))


def _as_backend_error(exc: BaseException) -> BiosError:
    if isinstance(exc, BiosError):
        return exc
    return BackendError(f"backend failure: {type(exc).__name__}: {exc}")
