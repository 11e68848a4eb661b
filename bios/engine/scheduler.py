"""The scheduler: per-session ordered lanes, batching across sessions, one worker thread.

Invariant (enforced here and nowhere else): the jobs of one lane run strictly in the order of
their sequence numbers 0, 1, 2, ..., one at a time, each only after the previous one has
finished; a missing number holds its lane until it is submitted or skipped. Jobs outside any
lane (sampling from frozen snapshots, the engine's own calls) have no order.

Each round the worker takes the head of every ready lane and every unordered job, groups the
backend work by (kind, base model) and makes ONE backend call per group, so concurrent
sessions on the same base model share device calls. One exception to "one at a time": when a
lane's head is a forward_backward and the job right after it, already queued, is an
optim_step, a backend that can (bios.backend FusedTraining) runs the two as one step; they are
still answered in order, and if the forward_backward fails the optim_step goes back to its
place in the lane, unrun. A forward_backward submitted with `step_follows` (by `train`) is
not taken before its optim_step is queued (or its number skipped), so that the two always
fuse there. Only the worker thread touches the backend. With an `inline` hook
there is no worker: the submitting thread runs every ready round itself, so jobs run in
submission order.

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
from bios.backend import Backend, ForwardBackwardWork, FusedTraining, OptimStepWork, ResultCallback, SampleWork
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
Pair = tuple["Job[Any]", "Job[Any]"]
"""A forward_backward job and the optim_step job right after it in its lane, run fused."""


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
    step_follows: bool = False
    """Its submitter queues an optim_step at seq + 1 right after it: a backend that fuses waits
    for that (or for the number to be skipped) before taking this job, so that the two fuse."""
    after_success: bool = False
    """Run only if the job before it in its lane (seq - 1) ran and succeeded; otherwise fail,
    changing nothing, with a ConflictError naming that job's error."""

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
    last: tuple[int, BiosError | None] | None = None
    """(seq, error or None) of the job of the lane answered last."""


class Scheduler:
    """Queues jobs and runs them on the backend from a single worker thread (none if `hook.inline`)."""

    def __init__(self, backend: Backend, hook: RequestHook = DIRECT, *, inline: bool | None = None) -> None:
        self.backend = backend
        self.hook = hook
        self.backend_calls = 0
        self.jobs_run = 0
        self.inline = hook.inline if inline is None else inline
        self._fusing = isinstance(backend, FusedTraining)
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

    def _take_round(self) -> list[Job[Any] | Pair]:
        """Heads of ready lanes plus all unordered jobs; advances each lane past its head. A head
        that fuses with the job after it (`_fuses`) comes as a pair, and the lane moves past both."""
        jobs: list[Job[Any] | Pair] = list(self._unordered)
        self._unordered = []
        for lane in self._lanes.values():
            while lane.next_seq in lane.pending and lane.pending[lane.next_seq] is None:
                del lane.pending[lane.next_seq]
                lane.next_seq += 1
            head = lane.pending.get(lane.next_seq)
            if head is None or (head.step_follows and self._fusing and lane.next_seq + 1 not in lane.pending):
                continue
            del lane.pending[lane.next_seq]
            lane.next_seq += 1
            after = lane.pending.get(lane.next_seq)
            if after is not None and self._fuses(head, after):
                del lane.pending[lane.next_seq]
                lane.next_seq += 1
                jobs.append((head, after))
            else:
                jobs.append(head)
        return jobs

    def _fuses(self, head: Job[Any], after: Job[Any]) -> bool:
        """Whether `head` and the next job of its lane, `after`, may run as one fused training step."""
        return (
            self._fusing
            and isinstance(head.work, Batched)
            and isinstance(after.work, Batched)
            and head.work.kind == "forward_backward"
            and after.work.kind == "optim_step"
            and head.work.base_model == after.work.base_model
        )

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

    def _run_round(self, jobs: list[Job[Any] | Pair]) -> None:
        groups: dict[tuple[BatchedKind, str], list[Job[Any]]] = defaultdict(list)
        fused: dict[str, list[Pair]] = defaultdict(list)
        for job in jobs:
            if isinstance(job, tuple):
                fused[cast(Batched, job[0].work).base_model].append(job)
                self.jobs_run += 2
                continue
            self.jobs_run += 1
            if job.after_success and (skipped := self._unsucceeded_predecessor(job)) is not None:
                self._resolve(job, skipped)
            elif isinstance(job.work, Batched):
                groups[(job.work.kind, job.work.base_model)].append(job)
            else:
                self._resolve(job, _called(job.work))
        for pairs in fused.values():
            self._run_pairs(pairs)
        for (kind, _model), group in groups.items():
            self._run_group(kind, group)

    def _run_pairs(self, pairs: list[Pair]) -> None:
        """One fused training call for (forward_backward, optim_step) pairs; each pair is answered
        in order, and an optim_step that did not run goes back to its lane."""
        self.backend_calls += 1
        work = [(cast(Batched, forward.work).item, cast(Batched, step.work).item) for forward, step in pairs]
        try:
            outputs = cast(FusedTraining, self.backend).train_step(
                cast(list[tuple[ForwardBackwardWork, OptimStepWork]], work)
            )
            if len(outputs) != len(pairs):
                raise BackendError(f"backend train_step returned {len(outputs)} results for {len(pairs)} pairs")
        except Exception as exc:  # noqa: BLE001 - a backend bug must fail its requests, not the worker
            outputs = [(_as_backend_error(exc), None)] * len(pairs)
        for (forward, step), (forward_output, step_output) in zip(pairs, outputs, strict=True):
            if step_output is None:
                self._requeue(step)  # first, so that a forward_backward reopened for its retry comes before it
            self._resolve(forward, forward_output)
            if step_output is not None:
                self._resolve(step, step_output)

    def _unsucceeded_predecessor(self, job: Job[Any]) -> ConflictError | None:
        """None if the job before `job` in its lane ran and succeeded; else the error `job` fails with."""
        with self._cond:
            lane = self._lanes.get(job.lane) if job.lane is not None else None
            last = lane.last if lane is not None else None
        if job.seq is not None and last == (job.seq - 1, None):
            return None
        cause = last[1] if last is not None and job.seq is not None and last[0] == job.seq - 1 else None
        reason = f"failed: {cause}" if cause is not None else "did not run"
        return ConflictError(
            f"{job.kind} at seq_id {job.seq} did not run: the request before it {reason}", field="seq_id"
        )

    def _requeue(self, job: Job[Any]) -> None:
        """Put a lane job taken but not run back in its place, as the lane's next job."""
        assert job.lane is not None and job.seq is not None
        with self._cond:
            lane = self._lanes.get(job.lane)
            if lane is not None:
                lane.pending[job.seq] = job
                lane.next_seq = job.seq
                self._cond.notify()
                return
        job.future.set_exception(
            NotFoundError(f"session {job.lane!r} was closed before this request ran", field="session_id")
        )

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
        if job.lane is not None and job.seq is not None:
            with self._cond:
                lane = self._lanes.get(job.lane)
                if lane is not None:
                    lane.last = (job.seq, outcome.error)
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
