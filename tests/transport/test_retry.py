"""`bios.retry`, the one retry layer: plain calls and work requests are retried on the
transport's clock, honour `retry_after`, count their attempts, and keep one idempotency key
while the service may hold the request (a fresh one once it answered with a failure)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable

import pytest

from bios import types
from bios.clock import current_attempt
from bios.errors import InvalidRequestError, RateLimitError, ServiceUnavailableError
from bios.retry import (
    NoAnswerError,
    RetryPolicy,
    call_with_retries,
    call_with_retries_async,
    request_key,
    retrying,
)


class StepClock:
    """A virtual clock that records every wake-up time and jumps to it."""

    def __init__(self) -> None:
        self.t, self.wakeups = 0.0, []

    def now(self) -> float:
        return self.t

    def advance_to(self, t: float) -> None:
        self.t = max(self.t, t)

    def call_at(self, t: float, fn: Callable[[], object]) -> None:
        self.wakeups.append(t)
        self.advance_to(t)
        fn()


def scripted(outcomes: list[object], seen: list[tuple[int, str]]) -> Callable[[], object]:
    """A call that records (attempt number, idempotency key) and raises or returns the next outcome."""

    def call() -> object:
        seen.append((current_attempt().number, request_key()))
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return call


def test_a_plain_call_is_retried_on_the_clock_honouring_retry_after() -> None:
    clock, seen = StepClock(), []
    outcomes = [ServiceUnavailableError("busy"), RateLimitError("slow down", retry_after=7.0), "answer"]
    assert call_with_retries(scripted(outcomes, seen), "get_info", lambda: clock) == "answer"
    assert [number for number, _ in seen] == [1, 2, 3]
    assert clock.wakeups == [0.5, 7.5]  # 0.5 s backoff, then the rate limit's 7 s beats 1 s


def test_a_request_the_service_may_hold_keeps_its_key_and_an_answered_one_gets_a_new_key() -> None:
    seen: list[tuple[int, str]] = []
    outcomes = [NoAnswerError("connection reset"), ServiceUnavailableError("fault"), "ok"]
    assert call_with_retries(scripted(outcomes, seen), "create_session", StepClock) == "ok"
    (_, first), (_, second), (_, third) = seen
    assert first == second != third


def test_final_errors_are_raised_at_once_and_retryable_ones_after_the_last_attempt() -> None:
    seen: list[tuple[int, str]] = []
    with pytest.raises(InvalidRequestError):
        call_with_retries(scripted([InvalidRequestError("bad", field="x")], seen), "x", StepClock)
    assert len(seen) == 1
    seen.clear()
    policy = RetryPolicy(max_attempts=3)
    with pytest.raises(ServiceUnavailableError):
        call_with_retries(scripted([ServiceUnavailableError("down")] * 3, seen), "x", StepClock, policy=policy)
    assert len(seen) == 3


def test_the_async_helper_retries_without_blocking_the_loop() -> None:
    clock, seen = StepClock(), []
    outcomes = [NoAnswerError("refused"), "caps"]

    async def call() -> object:
        await asyncio.sleep(0)
        return scripted(outcomes, seen)()

    async def main() -> tuple[object, bool]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(ticker())
        got = await call_with_retries_async(call, "capabilities", lambda: clock)
        other.cancel()
        return got, ticks > 0

    assert asyncio.run(main()) == ("caps", True)
    assert [number for number, _ in seen] == [1, 2] and seen[0][1] == seen[1][1]
    assert clock.wakeups == [0.5]


def test_work_requests_count_their_retries_and_give_up_releases_their_place() -> None:
    clock, seen, released = StepClock(), [], []
    answers = [NoAnswerError("lost"), ServiceUnavailableError("fault"), types.OptimStepResult(step=1)]

    def submit() -> concurrent.futures.Future:
        seen.append(request_key())
        future: concurrent.futures.Future = concurrent.futures.Future()
        answer = answers.pop(0)
        future.set_exception(answer) if isinstance(answer, BaseException) else future.set_result(answer)
        return future

    result = retrying(submit, clock, "optim_step", give_up=lambda: released.append(True)).result()
    assert result.step == 1 and result.metrics["retries"] == 2.0
    assert seen[0] == seen[1] != seen[2] and released == []
    failing = retrying(
        lambda: _failed(ServiceUnavailableError("down")),
        clock,
        "optim_step",
        give_up=lambda: released.append(True),
        policy=RetryPolicy(max_attempts=2),
    )
    assert isinstance(failing.exception(), ServiceUnavailableError) and released == [True]


def _failed(error: BaseException) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_exception(error)
    return future
