"""The clients' retry contract: what is retryable is retried, idempotently, with backoff.

A request whose error is `retryable` (503 unavailable, 408 timeout, 429 rate limited, an
expired session, a lost connection) is sent again with the same sequence number, so the
service applies it once: a request that failed having changed nothing runs again, and one
that ran but whose answer was lost is answered from the service's record. Backoff is measured
on the transport's clock — simulated time under the service simulator — and honours a
rate limit's `retry_after`. Every retry is logged on the `bios` logger, and a successful
result that needed retries says how many in `metrics["retries"]` and `timing.attempts`.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass

from bios.clock import Clock, attempt
from bios.errors import BiosError
from bios.futures import TimedFuture

log = logging.getLogger("bios")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Up to `max_attempts` tries; after the n-th failure wait min(initial·2^(n-1), max) seconds,
    or the error's `retry_after` when that is longer."""

    max_attempts: int = 12
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def backoff_s(self, failures: int, error: BiosError) -> float:
        delay = min(self.initial_backoff_s * 2 ** (failures - 1), self.max_backoff_s)
        return max(delay, float(getattr(error, "retry_after", 0.0)))


DEFAULT_POLICY = RetryPolicy()


def retrying(
    submit: Callable[[], concurrent.futures.Future],
    clock: Clock,
    label: str,
    *,
    give_up: Callable[[], None] | None = None,
    on_retry: Callable[[BiosError], None] | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> concurrent.futures.Future:
    """A future of `submit()`'s result that retries retryable failures per `policy`.

    `submit` must send the same request each time (same session and sequence number). The
    first attempt's non-retryable refusal is raised here, as if `submit` had been called
    directly; later failures resolve the returned future. `give_up` runs when the last attempt
    failed retryably (e.g. to release the sequence number); `on_retry(error)` before each retry.
    """
    retry = _Retry(submit, clock, label, give_up, on_retry, policy)
    retry.send(1, None)
    return retry.outer


class _Retry:
    """The attempts of one request (a plain object, so no reference cycle keeps a client alive)."""

    def __init__(
        self,
        submit: Callable[[], concurrent.futures.Future],
        clock: Clock,
        label: str,
        give_up: Callable[[], None] | None,
        on_retry: Callable[[BiosError], None] | None,
        policy: RetryPolicy,
    ) -> None:
        self.submit, self.clock, self.label, self.policy = submit, clock, label, policy
        self.give_up, self.on_retry = give_up, on_retry
        self.outer = TimedFuture(clock)
        self.first_enqueued_at: float | None = None

    def send(self, number: int, sent_at: float | None) -> None:
        try:
            with attempt(number, sent_at):
                inner = self.submit()
        except BiosError as exc:
            if number == 1 and not exc.retryable:
                raise
            self.failed(number, exc, self.clock.now(), None)
            return
        inner.add_done_callback(lambda done: self.settle(number, done))

    def settle(self, number: int, done: concurrent.futures.Future) -> None:
        error = done.exception()
        timing = getattr(done, "timing", None)
        if timing is not None:  # the request as a whole: queued with its first attempt, answered with its last
            self.first_enqueued_at = timing.enqueued_at if self.first_enqueued_at is None else self.first_enqueued_at
            timing = timing.model_copy(update={"attempts": number, "enqueued_at": self.first_enqueued_at})
        if error is None:
            self.outer.timing = timing
            self.outer.set_result(_counted(done.result(), number, self.outer.timing))
        else:
            self.failed(number, error, timing.finished_at if timing is not None else self.clock.now(), timing)

    def failed(self, number: int, error: BaseException, failed_at: float, timing: object) -> None:
        retryable = isinstance(error, BiosError) and error.retryable
        if retryable and number < self.policy.max_attempts:
            again_at = failed_at + self.policy.backoff_s(number, error)  # type: ignore[arg-type]
            log.info(
                "%s: attempt %d failed (%s: %s); retrying at t=%.3f s",
                self.label,
                number,
                error.code,
                error.message,
                again_at,
            )  # type: ignore[attr-defined]
            if self.on_retry is not None:
                self.on_retry(error)  # type: ignore[arg-type]
            self.clock.call_at(again_at, lambda: self.send(number + 1, again_at))
            return
        if retryable and self.give_up is not None:
            self.give_up()
        self.outer.timing = timing
        self.outer.set_exception(error)


def _counted(result: object, attempts: int, timing: object) -> object:
    """`result` with `timing` and, after retries, `metrics["retries"]` (for result types that have them)."""
    fields = getattr(type(result), "model_fields", {})
    update: dict[str, object] = {}
    if "timing" in fields and timing is not None:
        update["timing"] = timing
    if "metrics" in fields and attempts > 1:
        update["metrics"] = {**result.metrics, "retries": float(attempts - 1)}  # type: ignore[attr-defined]
    return result.model_copy(update=update) if update else result  # type: ignore[attr-defined]
