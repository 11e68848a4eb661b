"""The scheduler's invariants, on a recording fake backend: per-lane sequence order, gaps that
hold a lane until skipped, sequence conflicts, one backend call per (kind, base model) group,
failures confined to their group (the worker survives), and shutdown. Then batching through
the real engine on the emulator.

Determinism without sleeps: `hold()` parks the single worker thread inside a job until the
test releases it, so everything submitted meanwhile is taken in the same round; `drain()`
runs two marker jobs one after the other, which returns only once every earlier round is over.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator

import pytest
from helpers import MODEL, random_batch

import bios
from bios.admission import Admission, DirectHook, Outcome, Request
from bios.backend import Backend
from bios.engine.scheduler import Batched, Job, Scheduler
from bios.errors import (
    APITimeoutError,
    BackendError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)


class FakeBackend:
    """Implements the Backend protocol; records every batched call and answers `(kind, work)`.

    Work items are strings; "raise" makes the whole call raise, "reject" fails that item alone,
    and `short` makes the call return one result too few."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.short = False
        self.answer_early: int | None = None
        self.observe = lambda: None
        self.early_seen_done: object = None

    def _batch(self, kind: str, work: list[str]) -> list[object]:
        self.calls.append((kind, list(work)))
        if "raise" in work:
            raise RuntimeError("device fell over")
        out: list[object] = [self._answer(kind, w) for w in work]
        return out[:-1] if self.short else out

    @staticmethod
    def _answer(kind: str, w: str) -> object:
        """(kind, w), or: "reject" fails, "flaky" fails retryably changing nothing."""
        if w == "reject":
            return InvalidRequestError(f"bad item {w}", field="w")
        if w == "flaky":
            return ServiceUnavailableError("try again")
        return (kind, w)

    def create_adapter(self, spec: object, state: object = None) -> None: ...

    def delete_adapter(self, adapter_id: str) -> None: ...

    def export_state(self, adapter_id: str) -> object:
        raise NotFoundError(f"the fake backend keeps no adapters ({adapter_id})", field="adapter_id")

    def forward_backward(self, work: list[str], on_result=None) -> list[object]:
        return self._batch("forward_backward", work)

    def optim_step(self, work: list[str], on_result=None) -> list[object]:
        return self._batch("optim_step", work)

    def sample(self, work: list[str], on_result=None) -> list[object]:
        results = self._batch("sample", work)
        if on_result is not None and self.answer_early is not None:
            on_result(self.answer_early, results[self.answer_early])
            self.early_seen_done = self.observe()
        return results

    def close(self) -> None: ...


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def sched(backend: FakeBackend) -> Iterator[Scheduler]:
    scheduler = Scheduler(backend)  # type: ignore[arg-type]
    for lane in ("a", "b", "c", "d"):
        scheduler.open_lane(lane)
    yield scheduler
    release_gates()
    scheduler.close()


_GATES: list[threading.Event] = []


def hold(sched: Scheduler) -> threading.Event:
    """Park the worker inside a job; it resumes when the returned event is set (at the latest
    when the test ends, so that a failing test cannot leave the worker parked)."""
    entered, gate = threading.Event(), threading.Event()
    _GATES.append(gate)
    sched.call(lambda: (entered.set(), gate.wait()))
    entered.wait()
    return gate


def release_gates() -> None:
    while _GATES:
        _GATES.pop().set()


@pytest.fixture(autouse=True)
def _release_gates_at_the_end() -> Iterator[None]:
    yield
    release_gates()


def drain(sched: Scheduler) -> None:
    sched.call(lambda: None).result()
    sched.call(lambda: None).result()


def job(kind: str, work: str, model: str = "m") -> Job:
    return Job(Batched(kind, model, work))  # type: ignore[arg-type]  # the fake backend's work items are strings


def test_the_fake_backend_satisfies_the_protocol(backend: FakeBackend) -> None:
    assert isinstance(backend, Backend)


def test_jobs_of_a_lane_run_in_sequence_order_whatever_the_submission_order(
    sched: Scheduler, backend: FakeBackend
) -> None:
    f2 = sched.submit("a", 2, job("forward_backward", "w2"))
    f0 = sched.submit("a", 0, job("optim_step", "w0"))
    f1 = sched.submit("a", 1, job("forward_backward", "w1"))
    assert [f.result(timeout=30) for f in (f0, f1, f2)] == [
        ("optim_step", "w0"),
        ("forward_backward", "w1"),
        ("forward_backward", "w2"),
    ]
    assert backend.calls == [("optim_step", ["w0"]), ("forward_backward", ["w1"]), ("forward_backward", ["w2"])]
    assert sched.next_seq("a") == 3


def test_a_lane_never_runs_two_of_its_jobs_in_one_call(sched: Scheduler, backend: FakeBackend) -> None:
    gate = hold(sched)
    futures = [sched.submit("a", i, job("forward_backward", f"w{i}")) for i in range(3)]
    gate.set()
    assert [f.result(timeout=30)[1] for f in futures] == ["w0", "w1", "w2"]
    assert backend.calls == [("forward_backward", ["w0"]), ("forward_backward", ["w1"]), ("forward_backward", ["w2"])]


def test_a_gap_holds_the_lane_until_it_is_skipped(sched: Scheduler, backend: FakeBackend) -> None:
    f1 = sched.submit("a", 1, job("forward_backward", "w1"))
    other = sched.submit("b", 0, job("forward_backward", "b0"))
    assert other.result(timeout=30) == ("forward_backward", "b0")  # other lanes are not held
    drain(sched)
    assert not f1.done()
    assert backend.calls == [("forward_backward", ["b0"])]
    assert sched.next_seq("a") == 0
    sched.skip("a", 0)
    assert f1.result(timeout=30) == ("forward_backward", "w1")
    assert sched.next_seq("a") == 2


@pytest.mark.parametrize("kind", ["duplicate", "already_run", "skipped", "negative", "not_an_int"])
def test_a_used_sequence_number_is_a_conflict(sched: Scheduler, kind: str) -> None:
    if kind == "duplicate":
        sched.submit("a", 0, job("forward_backward", "first"))
        seq: object = 0
    elif kind == "already_run":
        sched.submit("a", 0, job("forward_backward", "first")).result(timeout=30)
        seq = 0
    elif kind == "skipped":
        sched.skip("a", 0)
        seq = 0
    else:
        seq = -1 if kind == "negative" else "0"
    with pytest.raises(ConflictError) as info:
        sched.submit("a", seq, job("forward_backward", "again"))  # type: ignore[arg-type]
    assert info.value.field == "seq_id"
    assert "next free one is 1" in info.value.message or kind in ("negative", "not_an_int")
    # the lane still works: the next free number runs
    nxt = sched.next_seq("a")
    assert sched.submit("a", nxt, job("sample", "later")).result(timeout=30) == ("sample", "later")


def test_unknown_lane_is_not_found(sched: Scheduler) -> None:
    with pytest.raises(NotFoundError) as info:
        sched.submit("nope", 0, job("forward_backward", "w"))
    assert info.value.field == "session_id"


def test_heads_of_lanes_on_one_base_model_share_one_backend_call(sched: Scheduler, backend: FakeBackend) -> None:
    gate = hold(sched)
    fb = [sched.submit(lane, 0, job("forward_backward", f"{lane}0")) for lane in ("a", "b", "c")]
    other_model = sched.submit("d", 0, job("forward_backward", "d0", model="n"))
    loose = sched.submit(None, None, job("forward_backward", "u", model="m"))
    gate.set()
    assert [f.result(timeout=30) for f in fb] == [("forward_backward", w) for w in ("a0", "b0", "c0")]
    assert other_model.result(timeout=30) == ("forward_backward", "d0")
    assert loose.result(timeout=30) == ("forward_backward", "u")
    assert sorted((k, sorted(w)) for k, w in backend.calls) == [
        ("forward_backward", ["a0", "b0", "c0", "u"]),
        ("forward_backward", ["d0"]),
    ]
    assert sched.backend_calls == 2


def test_different_kinds_are_separate_calls(sched: Scheduler, backend: FakeBackend) -> None:
    gate = hold(sched)
    futures = [
        sched.submit("a", 0, job("forward_backward", "a0")),
        sched.submit("b", 0, job("optim_step", "b0")),
        sched.submit("c", 0, job("sample", "c0")),
        sched.submit("d", 0, job("optim_step", "d0")),
    ]
    gate.set()
    for f in futures:
        f.result(timeout=30)
    assert sorted((k, sorted(w)) for k, w in backend.calls) == [
        ("forward_backward", ["a0"]),
        ("optim_step", ["b0", "d0"]),
        ("sample", ["c0"]),
    ]


def test_a_raising_backend_fails_only_its_group_and_the_worker_keeps_going(
    sched: Scheduler, backend: FakeBackend
) -> None:
    gate = hold(sched)
    bad = [sched.submit("a", 0, job("forward_backward", "raise")), sched.submit("b", 0, job("forward_backward", "ok"))]
    good = sched.submit("c", 0, job("forward_backward", "fine", model="n"))
    gate.set()
    for f in bad:
        err = f.exception(timeout=30)
        assert isinstance(err, BackendError) and "RuntimeError: device fell over" in err.message
    assert good.result(timeout=30) == ("forward_backward", "fine")
    assert sched.submit("a", 1, job("optim_step", "after")).result(timeout=30) == ("optim_step", "after")


def test_an_item_error_fails_that_item_alone(sched: Scheduler) -> None:
    gate = hold(sched)
    rejected = sched.submit("a", 0, job("forward_backward", "reject"))
    fine = sched.submit("b", 0, job("forward_backward", "ok"))
    gate.set()
    err = rejected.exception(timeout=30)
    assert isinstance(err, InvalidRequestError) and err.field == "w"
    assert fine.result(timeout=30) == ("forward_backward", "ok")


def test_a_backend_returning_too_few_results_fails_its_group_and_the_worker_survives(
    sched: Scheduler, backend: FakeBackend
) -> None:
    backend.short = True
    gate = hold(sched)
    group = [sched.submit(lane, 0, job("forward_backward", f"{lane}0")) for lane in ("a", "b")]
    gate.set()
    for f in group:
        err = f.exception(timeout=30)
        assert isinstance(err, BackendError) and "2 requests" in err.message
    backend.short = False
    assert sched.submit("a", 1, job("sample", "a1")).result(timeout=30) == ("sample", "a1")


def test_a_failing_finish_fails_its_job_only(sched: Scheduler) -> None:
    def finish(output: object) -> object:
        raise KeyError("missing field")

    failing = sched.submit("a", 0, Job(Batched("forward_backward", "m", "a0"), finish))  # type: ignore[arg-type]
    assert isinstance(failing.exception(timeout=30), BackendError)
    assert sched.submit("a", 1, job("forward_backward", "a1")).result(timeout=30) == ("forward_backward", "a1")


def test_a_cancelled_future_does_not_stop_the_worker_or_the_lane(sched: Scheduler, backend: FakeBackend) -> None:
    gate = hold(sched)
    cancelled = sched.submit("a", 0, job("forward_backward", "a0"))
    assert cancelled.cancel()
    gate.set()
    assert sched.submit("a", 1, job("optim_step", "a1")).result(timeout=30) == ("optim_step", "a1")
    assert backend.calls == [("forward_backward", ["a0"]), ("optim_step", ["a1"])]  # a0 still ran, in order


def test_call_jobs_run_on_the_worker_and_report_errors(sched: Scheduler) -> None:
    assert sched.call(lambda: threading.current_thread().name).result(timeout=30) == "bios-engine"
    err = sched.call(lambda: 1 / 0).exception(timeout=30)
    assert isinstance(err, BackendError) and "ZeroDivisionError" in err.message


def test_close_fails_pending_jobs_and_refuses_new_ones(backend: FakeBackend) -> None:
    sched = Scheduler(backend)  # type: ignore[arg-type]
    sched.open_lane("a")
    done = sched.submit("a", 0, job("forward_backward", "a0"))
    assert done.result(timeout=30) == ("forward_backward", "a0")
    pending = sched.submit("a", 2, job("forward_backward", "a2"))  # seq 1 never comes
    sched.close()
    err = pending.exception(timeout=30)
    assert isinstance(err, BackendError) and "shut down" in err.message
    with pytest.raises(BackendError, match="shut down"):
        sched.submit("a", 1, job("forward_backward", "a1"))
    assert backend.calls == [("forward_backward", ["a0"])]


# ---- fused training steps ---------------------------------------------------------------------


class FusingBackend(FakeBackend):
    """A FakeBackend that also runs (forward_backward, optim_step) pairs as one `train_step` call;
    a pair whose forward_backward fails (as `_answer` says) does not run its step."""

    def train_step(self, work: list[tuple[str, str]]) -> list[tuple[object, object]]:
        self.calls.append(("train_step", [f"{fb}+{step}" for fb, step in work]))
        outputs: list[tuple[object, object]] = []
        for fb, step in work:
            forward = self._answer("forward_backward", fb)
            outputs.append((forward, None if isinstance(forward, Exception) else self._answer("optim_step", step)))
        return outputs


@pytest.fixture
def fusing() -> Iterator[tuple[Scheduler, FusingBackend]]:
    backend = FusingBackend()
    scheduler = Scheduler(backend)  # type: ignore[arg-type]
    for lane in ("a", "b", "c"):
        scheduler.open_lane(lane)
    yield scheduler, backend
    release_gates()
    scheduler.close()


def _answered_in_order(*futures: concurrent.futures.Future) -> list[int]:
    """Records the order in which `futures` are answered (their indices), as they are."""
    order: list[int] = []
    for index, future in enumerate(futures):
        future.add_done_callback(lambda _f, i=index: order.append(i))
    return order


def test_a_forward_backward_and_the_optim_step_queued_after_it_run_as_one_fused_call(
    fusing: tuple[Scheduler, FusingBackend],
) -> None:
    sched, backend = fusing
    gate = hold(sched)
    pairs = [
        (
            sched.submit(lane, 0, job("forward_backward", f"{lane}0")),
            sched.submit(lane, 1, job("optim_step", f"{lane}1")),
        )
        for lane in ("a", "b")
    ]
    alone = sched.submit("c", 0, job("forward_backward", "c0"))  # nothing queued after it: not fused
    order = _answered_in_order(*pairs[0])
    gate.set()
    assert [(fb.result(timeout=30), step.result(timeout=30)) for fb, step in pairs] == [
        (("forward_backward", f"{lane}0"), ("optim_step", f"{lane}1")) for lane in ("a", "b")
    ]
    assert alone.result(timeout=30) == ("forward_backward", "c0")
    assert sorted(backend.calls) == [("forward_backward", ["c0"]), ("train_step", ["a0+a1", "b0+b1"])]
    assert order == [0, 1] and sched.backend_calls == 2 and sched.jobs_run == 6  # with hold's call


def test_only_a_forward_backward_followed_by_an_optim_step_on_one_model_fuses(
    fusing: tuple[Scheduler, FusingBackend],
) -> None:
    sched, backend = fusing
    gate = hold(sched)
    futures = [
        sched.submit("a", 0, job("optim_step", "a0")),
        sched.submit("a", 1, job("forward_backward", "a1")),
        sched.submit("b", 0, job("forward_backward", "b0")),
        sched.submit("b", 1, job("sample", "b1")),
        sched.submit("c", 0, job("forward_backward", "c0")),
        sched.submit("c", 1, job("optim_step", "c1", model="n")),
    ]
    gate.set()
    for future in futures:
        future.result(timeout=30)
    assert not any(kind == "train_step" for kind, _ in backend.calls)


def test_a_failed_forward_backward_sends_its_optim_step_back_to_its_place(
    fusing: tuple[Scheduler, FusingBackend],
) -> None:
    sched, backend = fusing
    gate = hold(sched)
    fb, step = sched.submit("a", 0, job("forward_backward", "reject")), sched.submit("a", 1, job("optim_step", "a1"))
    later = sched.submit("a", 2, job("sample", "a2"))
    gate.set()
    assert isinstance(fb.exception(timeout=30), InvalidRequestError)
    assert step.result(timeout=30) == ("optim_step", "a1")  # it ran after all, alone, in its place
    assert later.result(timeout=30) == ("sample", "a2")
    assert backend.calls == [("train_step", ["reject+a1"]), ("optim_step", ["a1"]), ("sample", ["a2"])]


def test_a_step_after_success_is_refused_when_the_forward_backward_before_it_failed(
    fusing: tuple[Scheduler, FusingBackend],
) -> None:
    sched, backend = fusing
    gate = hold(sched)
    fb = sched.submit("a", 0, job("forward_backward", "reject"))
    step = sched.submit("a", 1, Job(Batched("optim_step", "m", "a1"), after_success=True))  # type: ignore[arg-type]
    gate.set()
    assert isinstance(fb.exception(timeout=30), InvalidRequestError)
    error = step.exception(timeout=30)
    assert isinstance(error, ConflictError) and error.field == "seq_id" and "bad item reject" in error.message
    assert backend.calls == [("train_step", ["reject+a1"])]  # the step itself never ran
    assert sched.submit("a", 2, job("optim_step", "a2")).result(timeout=30) == ("optim_step", "a2")


def test_a_step_after_success_waits_for_the_retry_of_a_forward_backward_that_failed_retryably(
    fusing: tuple[Scheduler, FusingBackend],
) -> None:
    sched, backend = fusing
    gate = hold(sched)
    flaky = sched.submit("a", 0, job("forward_backward", "flaky"))
    step = sched.submit("a", 1, Job(Batched("optim_step", "m", "a1"), after_success=True))  # type: ignore[arg-type]
    gate.set()
    assert isinstance(flaky.exception(timeout=30), ServiceUnavailableError)
    drain(sched)
    assert not step.done()  # seq 0 is open again for the retry
    retried = sched.submit("a", 0, job("forward_backward", "a0"))
    assert retried.result(timeout=30) == ("forward_backward", "a0")
    assert step.result(timeout=30) == ("optim_step", "a1")
    assert backend.calls[0] == ("train_step", ["flaky+a1"])
    assert backend.calls[1] == ("train_step", ["a0+a1"])  # the retry found the step queued after it


def test_a_step_after_success_runs_after_a_forward_backward_that_ran_alone_and_not_after_a_skipped_one(
    sched: Scheduler, backend: FakeBackend
) -> None:
    assert sched.submit("a", 0, job("forward_backward", "a0")).result(timeout=30) == ("forward_backward", "a0")
    step = Job(Batched("optim_step", "m", "a1"), after_success=True)  # type: ignore[arg-type]
    assert sched.submit("a", 1, step).result(timeout=30) == ("optim_step", "a1")
    sched.skip("a", 2)
    unrun = Job(Batched("optim_step", "m", "a3"), after_success=True)  # type: ignore[arg-type]
    error = sched.submit("a", 3, unrun).exception(timeout=30)
    assert isinstance(error, ConflictError) and "did not run" in error.message
    assert backend.calls == [("forward_backward", ["a0"]), ("optim_step", ["a1"])]


# ---- through the real engine --------------------------------------------------------------


def test_concurrent_sessions_share_backend_calls_on_the_emulator(service: bios.ServiceClient) -> None:
    engine = service.transport
    sessions = [service.create_lora_training_client(base_model=MODEL, rank=8, seed=0) for _ in range(4)]
    batches = [random_batch(100 + i, size=2) for i in range(4)]
    gate = hold(engine.scheduler)
    calls_before, jobs_before = engine.scheduler.backend_calls, engine.scheduler.jobs_run
    futures = [s.forward_backward(b) for s, b in zip(sessions, batches)]
    gate.set()
    batched = [f.result(timeout=120) for f in futures]
    assert engine.scheduler.backend_calls - calls_before == 1 < len(futures)
    assert engine.scheduler.jobs_run - jobs_before == 4
    # batching changes nothing: each result equals the same request run alone on a twin
    for data, result in zip(batches, batched):
        twin = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0)
        alone = twin.forward_backward(data).result(timeout=120)
        assert alone.loss == result.loss
        assert [o["logprobs"].data for o in alone.loss_fn_outputs] == [
            o["logprobs"].data for o in result.loss_fn_outputs
        ]
    assert len({r.loss for r in batched}) == 4  # the four requests really were different


def test_a_sample_answered_early_resolves_before_the_backend_call_returns(sched, backend):
    first, second = job("sample", "first"), job("sample", "second")
    backend.answer_early = 1
    backend.observe = lambda: (first.future.done(), second.future.done())
    gate = hold(sched)  # both jobs queue up, so they share one backend call
    sched.submit(None, None, first)
    sched.submit(None, None, second)
    gate.set()
    assert second.future.result(timeout=10) == ("sample", "second")
    assert first.future.result(timeout=10) == ("sample", "first")
    assert [kind for kind, _ in backend.calls] == ["sample"]
    assert backend.early_seen_done == (False, True)  # the second was answered while the call still ran


def test_a_retryable_failure_that_changed_nothing_keeps_its_number_open(sched: Scheduler, backend: FakeBackend) -> None:
    failed = sched.submit("a", 0, job("forward_backward", "flaky"))
    later = sched.submit("a", 1, job("optim_step", "w1"))
    with pytest.raises(ServiceUnavailableError):
        failed.result(timeout=30)
    drain(sched)
    assert not later.done()  # the lane waits for the retry of 0
    assert sched.next_seq("a") == 0
    retried = sched.submit("a", 0, job("forward_backward", "w0"))
    assert retried.result(timeout=30) == ("forward_backward", "w0") and later.result(timeout=30) == ("optim_step", "w1")


class LosingHook(DirectHook):
    """Loses the answer of work "lost" (it ran; its caller hears a retryable timeout) and
    answers the retry at that number from its record, as the service simulator does."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str | None, int | None], tuple[str, object]] = {}

    def admit(self, request: Request) -> Admission:
        kept = self.kept.get((request.lane, request.seq))
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        if kept is None or kept[0] != request.kind:
            return Admission(future)
        future.set_result(kept[1])
        return Admission(future, answered=True)

    def settle(self, request: Request, future: object, outcome: Outcome) -> Outcome:
        if request.work != "lost" or outcome.error is not None:
            return outcome
        self.kept[(request.lane, request.seq)] = (request.kind, outcome.value)
        return Outcome(error=APITimeoutError("the answer was lost"), applied=True)


def test_a_lost_answer_uses_its_number_and_a_retry_gets_it_without_running_again(backend: FakeBackend) -> None:
    sched = Scheduler(backend, LosingHook())  # type: ignore[arg-type]
    sched.open_lane("a")
    with pytest.raises(APITimeoutError):
        sched.submit("a", 0, job("optim_step", "lost")).result(timeout=30)
    assert sched.next_seq("a") == 1
    calls = len(backend.calls)
    assert sched.submit("a", 0, job("optim_step", "anything")).result(timeout=30) == ("optim_step", "lost")
    assert len(backend.calls) == calls  # answered from the record
    with pytest.raises(ConflictError):  # another kind of request at that number is a conflict
        sched.submit("a", 0, job("forward_backward", "w"))
    assert sched.submit("a", 1, job("forward_backward", "w1")).result(timeout=30) == ("forward_backward", "w1")
    sched.close()
