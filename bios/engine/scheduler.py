"""The scheduler: per-session ordered lanes, batching across sessions, one worker thread.

Invariant (enforced here and nowhere else): the jobs of one lane run strictly in the order of
their sequence numbers 0, 1, 2, ..., one at a time, each only after the previous one has
finished; a missing number holds its lane until it is submitted or skipped. Jobs outside any
lane (sampling from frozen snapshots) have no order.

Each round the worker takes the head of every ready lane and every unordered job, groups
them by (kind, base model) and makes ONE backend call per group, so concurrent sessions on
the same base model share device calls. Only the worker thread touches the backend. In
`inline` mode (the simulator's deterministic replay) there is no worker: the submitting
thread runs every ready round itself, so jobs run in submission order.

Retries: a lane job that fails with a retryable error that changed nothing leaves its
sequence number open (the lane waits for it to be submitted again, or skipped). A job that ran
but whose answer was lost (`LostAnswer`) uses its number up, and submitting that number again
gets the stored answer instead of running twice.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from bios.backend import Backend, LostAnswer, Ticket, Timed, Timing
from bios.errors import BackendError, BiosError, ConflictError, NotFoundError
from bios.futures import TimedFuture
from bios.types import RequestTiming

BATCHED_KINDS = ("forward_backward", "optim_step", "sample")
LOST_KEPT = 1024
"""How many sequence numbers back a lost answer is kept for a retry."""


@dataclass(slots=True)
class Job:
    """One unit of work. kind "call": `work` is a zero-argument callable run on the worker;
    otherwise `work` is a backend work item. `finish` maps the backend's output to the result."""

    kind: str
    base_model: str
    work: object
    finish: Callable[[object], object] = lambda output: output
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    ticket: Ticket | None = None
    """Set for a simulating backend: the job's future is then a `TimedFuture`."""
    lane: str | None = None
    seq: int | None = None


@dataclass(slots=True)
class _Lane:
    next_seq: int = 0
    pending: dict[int, Job | None] = field(default_factory=dict)
    lost: dict[int, tuple[str, object]] = field(default_factory=dict)
    """seq → (kind, result) of jobs that ran but whose answer was lost (the last LOST_KEPT numbers)."""


class Scheduler:
    """Queues jobs and runs them on the backend from a single worker thread."""

    def __init__(self, backend: Backend, *, inline: bool = False) -> None:
        self.backend = backend
        self.backend_calls = 0
        self.jobs_run = 0
        self.inline = inline
        self._lanes: dict[str, _Lane] = {}
        self._unordered: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._draining = False
        self._worker: threading.Thread | None = None
        if not inline:
            self._worker = threading.Thread(target=self._run, name="bios-engine", daemon=True)
            self._worker.start()

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

    def submit(self, lane_id: str | None, seq: int | None, job: Job) -> concurrent.futures.Future:
        """Queue `job` at position `seq` of `lane_id` (or unordered when lane_id is None). A
        `seq` whose job ran but lost its answer gets that answer again (same kind only)."""
        with self._cond:
            self._check_open()
            if lane_id is None:
                self._unordered.append(job)
            else:
                lost = self._lane(lane_id).lost.get(seq)  # type: ignore[arg-type]
                if lost is not None and lost[0] == job.kind:
                    self._answer_again(job, lost[1])
                    return job.future
                self._reserve(lane_id, seq)[seq] = job  # type: ignore[index]
                job.lane, job.seq = lane_id, seq
            self._cond.notify()
        self._run_inline()
        return job.future

    def _answer_again(self, job: Job, result: object) -> None:
        """Resolve `job` with the stored `result` of its sequence number, answered at once."""
        if job.ticket is not None:
            at = job.ticket.enqueued_at
            self._stamp(job, Timing(at, at, at))
            result = _with_timing(result, job.future.timing)
        job.future.set_result(result)

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
        for job in lane.pending.values() if lane else ():
            if job is not None and not job.future.done():
                job.future.set_exception(
                    NotFoundError(f"session {lane_id!r} was closed before this request ran", field="session_id")
                )

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` on the worker thread, outside any lane (e.g. creating an adapter)."""
        return self.submit(None, None, Job("call", "", fn))

    def close(self) -> None:
        """Stop the worker; jobs still queued fail with BackendError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._worker is not None:
            self._worker.join(timeout=60)
        closed = BackendError("the engine was shut down before this request ran")
        for job in self._unordered + [j for lane in self._lanes.values() for j in lane.pending.values() if j]:
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

    def _reserve(self, lane_id: str, seq: int | None) -> dict[int, Job | None]:
        lane = self._lane(lane_id)
        if not isinstance(seq, int) or seq < lane.next_seq or seq in lane.pending:
            raise ConflictError(
                f"seq_id {seq} of session {lane_id} is already used; the next free one is {self.next_seq(lane_id)}",
                field="seq_id",
            )
        return lane.pending

    def _take_round(self) -> list[Job]:
        """Heads of ready lanes plus all unordered jobs; advances each lane past its head."""
        jobs, self._unordered = self._unordered, []
        for lane in self._lanes.values():
            while lane.next_seq in lane.pending and lane.pending[lane.next_seq] is None:
                del lane.pending[lane.next_seq]
                lane.next_seq += 1
            if lane.next_seq in lane.pending:
                jobs.append(lane.pending.pop(lane.next_seq))  # type: ignore[arg-type]
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

    def _run_round(self, jobs: list[Job]) -> None:
        groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
        for job in jobs:
            if job.kind in BATCHED_KINDS:
                groups[(job.kind, job.base_model)].append(job)
            else:
                self._resolve(job, lambda job=job: job.work())  # type: ignore[operator]
        for (kind, _model), group in groups.items():
            self.backend_calls += 1
            answered: set[int] = set()

            def answer_early(
                index: int, output: object, group: list[Job] = group, answered: set[int] = answered
            ) -> None:
                """The backend reports a request as soon as its result is on the host."""
                if index not in answered:
                    answered.add(index)
                    self._resolve(group[index], lambda: output)

            try:
                call = getattr(self.backend, kind)
                works = [job.work for job in group]
                outputs = list(call(works, answer_early))
                if len(outputs) != len(group):
                    raise BackendError(f"backend {kind} returned {len(outputs)} results for {len(group)} requests")
            except Exception as exc:  # noqa: BLE001 - a backend bug must fail its requests, not the worker
                outputs = [_as_backend_error(exc)] * len(group)
            for index, (job, output) in enumerate(zip(group, outputs, strict=True)):
                if index not in answered:
                    self._resolve(job, lambda output=output: output)

    def _resolve(self, job: Job, produce: Callable[[], object]) -> None:
        self.jobs_run += 1
        error: BiosError | None = None
        changed_nothing = True
        try:
            output = produce()
            if isinstance(output, Timed):
                self._stamp(job, output.timing)
                output = output.value
            if isinstance(output, LostAnswer):
                changed_nothing = False
                self._remember_lost(job, job.finish(output.output))
                raise output.error
            if isinstance(output, BaseException):
                raise output
            result = _with_timing(job.finish(output), getattr(job.future, "timing", None))
        except Exception as exc:  # noqa: BLE001 - every failure belongs to the job's future
            error = _as_backend_error(exc)
            if error.retryable and changed_nothing:
                self._reopen(job)
        try:
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass  # the caller cancelled its future; the job ran anyway, in order, and nobody waits

    def _stamp(self, job: Job, timing: Timing) -> None:
        if isinstance(job.future, TimedFuture):
            attempt = job.ticket.attempt if job.ticket is not None else 1
            job.future.timing = RequestTiming(
                enqueued_at=timing.enqueued_at,
                started_at=timing.started_at,
                finished_at=timing.finished_at,
                attempts=attempt,
            )

    def _remember_lost(self, job: Job, result: object) -> None:
        """Keep the answer of a lane job that ran but whose answer was lost, for its retry."""
        if job.lane is None:
            return
        with self._cond:
            lane = self._lanes.get(job.lane)
            if lane is not None:
                lane.lost[job.seq] = (job.kind, result)  # type: ignore[index]
                for old in [seq for seq in lane.lost if seq < job.seq - LOST_KEPT]:  # type: ignore[operator]
                    del lane.lost[old]

    def _reopen(self, job: Job) -> None:
        """A lane job failed retryably without changing anything: its number waits for a retry."""
        if job.lane is None:
            return
        with self._cond:
            lane = self._lanes.get(job.lane)
            if lane is not None and lane.next_seq == job.seq + 1:  # type: ignore[operator]
                lane.next_seq = job.seq  # type: ignore[assignment]


def _with_timing(result: object, timing: RequestTiming | None) -> object:
    """`result` carrying `timing`, when it is a result type with a `timing` field."""
    if timing is None or "timing" not in getattr(type(result), "model_fields", {}):
        return result
    return result.model_copy(update={"timing": timing})  # type: ignore[attr-defined]


def _as_backend_error(exc: Exception) -> BiosError:
    if isinstance(exc, BiosError):
        return exc
    return BackendError(f"backend failure: {type(exc).__name__}: {exc}")
