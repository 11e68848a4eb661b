"""The clients' retry contract: what is retryable is retried, idempotently, with backoff.

This is the one place where Bios retries; transports send each attempt once. A request whose
error is `retryable` (503 unavailable, 408 timeout, 429 rate limited, an expired session, a
lost connection) is sent again: a work request with the same sequence number, so the service
applies it once — a request that failed having changed nothing runs again, and one that ran
but whose answer was lost is answered from the service's record. Backoff is measured on the
transport's clock — simulated time under the service simulator — and honours a rate limit's
`retry_after`. Every retry is logged on the `bios` logger, and a successful result that needed
retries says how many in `metrics["retries"]` and `timing.attempts`.

Idempotency keys: every attempt of one request carries the key of `request_key()`. An attempt
that got no answer (`NoAnswerError`: the service may hold it) is sent again under the same key,
so the service hands back what it has; an attempt the service answered with a retryable failure
changed nothing, and its retry goes under a fresh key, since the service answers a key it has
seen with that key's first answer. Either way the request is applied once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from bios.clock import Clock, attempt
from bios.errors import APIConnectionError, BiosError
from bios.futures import TimedFuture
from bios.types import RequestTiming

log = logging.getLogger("bios")
T = TypeVar("T")

_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("bios_request_key", default=None)


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


class NoAnswerError(APIConnectionError):
    """No answer came: the service could not be reached, or the connection failed before its
    answer arrived, so it may hold the request. Raised by a transport (never decoded from an
    answer); its retry keeps the idempotency key."""


def request_key() -> str:
    """The idempotency key of the request being sent in this context (the one its retries share,
    see the module docstring), or a new key outside the retry layer."""
    return _KEY.get() or uuid.uuid4().hex


class _Tries:
    """The attempts of one logical request: their idempotency key, and when to try again."""

    def __init__(self, label: str, policy: RetryPolicy, on_retry: Callable[[BiosError], None] | None) -> None:
        self.label, self.policy, self.on_retry = label, policy, on_retry
        self.key = uuid.uuid4().hex

    @contextlib.contextmanager
    def sending(self, number: int, sent_at: float | None) -> Iterator[None]:
        """Within this block, requests sent by this thread are attempt `number` under this key."""
        token = _KEY.set(self.key)
        try:
            with attempt(number, sent_at):
                yield
        finally:
            _KEY.reset(token)

    def again_at(self, number: int, error: BaseException, failed_at: float) -> float | None:
        """When to send attempt `number + 1`, attempt `number` having failed with `error` at
        clock time `failed_at`; None when the error is final or the attempts are used up."""
        if not isinstance(error, BiosError) or not error.retryable or number >= self.policy.max_attempts:
            return None
        if not isinstance(error, NoAnswerError):
            self.key = uuid.uuid4().hex  # the service answered this key: the next try is a new request
        again_at = failed_at + self.policy.backoff_s(number, error)
        log.info(
            "%s: attempt %d failed (%s: %s); retrying at t=%.3f s",
            self.label,
            number,
            error.code,
            error.message,
            again_at,
        )
        if self.on_retry is not None:
            self.on_retry(error)
        return again_at


# ---- plain calls ----------------------------------------------------------------------------


def call_with_retries(
    call: Callable[[], T], label: str, clock: Callable[[], Clock], *, policy: RetryPolicy = DEFAULT_POLICY
) -> T:
    """`call()`'s result, calling it again per `policy` while it raises a retryable BiosError
    (waiting on `clock()`, read after each failure); the last error is raised. Blocks."""
    tries = _Tries(label, policy, None)
    number, sent_at = 1, None
    while True:
        try:
            with tries.sending(number, sent_at):
                return call()
        except BiosError as exc:
            waits_on = clock()
            again_at = tries.again_at(number, exc, waits_on.now())
            if again_at is None:
                raise
        done = threading.Event()
        waits_on.call_at(again_at, done.set)
        done.wait()
        number, sent_at = number + 1, again_at


async def call_with_retries_async(
    call: Callable[[], Awaitable[T]], label: str, clock: Callable[[], Clock], *, policy: RetryPolicy = DEFAULT_POLICY
) -> T:
    """`call_with_retries` for a coroutine function: backoff waits without blocking the loop."""
    tries = _Tries(label, policy, None)
    number, sent_at = 1, None
    while True:
        try:
            with tries.sending(number, sent_at):
                return await call()
        except BiosError as exc:
            waits_on = clock()
            again_at = tries.again_at(number, exc, waits_on.now())
            if again_at is None:
                raise
        await _until(waits_on, again_at)
        number, sent_at = number + 1, again_at


async def _until(clock: Clock, t: float) -> None:
    """Return once `clock` reaches `t` (at once on a virtual clock that jumps)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    clock.call_at(t, lambda: loop.call_soon_threadsafe(wake))
    await waiter


# ---- work requests (futures) ----------------------------------------------------------------


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
    retry = _Retry(submit, clock, _Tries(label, policy, on_retry), give_up)
    retry.send(1, None)
    return retry.outer


async def retrying_async(
    submit: Callable[[], Awaitable[concurrent.futures.Future]],
    resend: Callable[[], concurrent.futures.Future],
    clock: Clock,
    label: str,
    *,
    give_up: Callable[[], None] | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> concurrent.futures.Future:
    """`retrying` for async callers: attempts are sent by awaiting `submit()` until the service
    takes one (the backoff after a refusal is awaited, never slept, on the caller's loop); when
    a taken attempt fails later, the retries are sent by `resend()` (the same request, blocking)
    on the thread that saw the failure, which never runs the caller's loop. `give_up` runs on a
    worker thread when it is called from here."""
    retry = _Retry(resend, clock, _Tries(label, policy, None), give_up)
    number, sent_at = 1, None
    while True:
        try:
            with retry.tries.sending(number, sent_at):
                inner = await submit()
        except BiosError as exc:
            if number == 1 and not exc.retryable:
                raise
            again_at = retry.tries.again_at(number, exc, clock.now())
            if again_at is None:
                if exc.retryable and give_up is not None:
                    await asyncio.to_thread(give_up)
                retry.outer.set_exception(exc)
                return retry.outer
            await _until(clock, again_at)
            number, sent_at = number + 1, again_at
            continue
        retry.watch(number, inner)
        return retry.outer


class _Retry:
    """The attempts of one request (a plain object, so no reference cycle keeps a client alive)."""

    def __init__(
        self,
        submit: Callable[[], concurrent.futures.Future],
        clock: Clock,
        tries: _Tries,
        give_up: Callable[[], None] | None,
    ) -> None:
        self.submit, self.clock, self.tries, self.give_up = submit, clock, tries, give_up
        self.outer = TimedFuture(clock)
        self.first_enqueued_at: float | None = None

    def send(self, number: int, sent_at: float | None) -> None:
        try:
            with self.tries.sending(number, sent_at):
                inner = self.submit()
        except BiosError as exc:
            if number == 1 and not exc.retryable:
                raise
            self.failed(number, exc, self.clock.now(), None)
            return
        self.watch(number, inner)

    def watch(self, number: int, inner: concurrent.futures.Future) -> None:
        """Settle the outer future, or try again, once attempt `number`'s `inner` is done."""
        inner.add_done_callback(lambda done: self.settle(number, done))

    def settle(self, number: int, done: concurrent.futures.Future) -> None:
        error = done.exception()
        timing = done.timing if isinstance(done, TimedFuture) else None
        if timing is not None:  # the request as a whole: queued with its first attempt, answered with its last
            self.first_enqueued_at = timing.enqueued_at if self.first_enqueued_at is None else self.first_enqueued_at
            timing = timing.model_copy(update={"attempts": number, "enqueued_at": self.first_enqueued_at})
        if error is None:
            self.outer.timing = timing
            self.outer.set_result(_counted(done.result(), number, timing))
        else:
            self.failed(number, error, timing.finished_at if timing is not None else self.clock.now(), timing)

    def failed(self, number: int, error: BaseException, failed_at: float, timing: RequestTiming | None) -> None:
        again_at = self.tries.again_at(number, error, failed_at)
        if again_at is not None:
            self.clock.call_at(again_at, lambda: self.send(number + 1, again_at))
            return
        if isinstance(error, BiosError) and error.retryable and self.give_up is not None:
            self.give_up()
        self.outer.timing = timing
        self.outer.set_exception(error)


def _counted(result: object, attempts: int, timing: RequestTiming | None) -> object:
    """`result` with `timing` and, after retries, `metrics["retries"]` (for result types that have them)."""
    if not isinstance(result, BaseModel):
        return result
    fields = type(result).model_fields
    update: dict[str, object] = {}
    if "timing" in fields and timing is not None:
        update["timing"] = timing
    metrics = getattr(result, "metrics", None)
    if "metrics" in fields and isinstance(metrics, dict) and attempts > 1:
        update["metrics"] = {**metrics, "retries": float(attempts - 1)}
    return result.model_copy(update=update) if update else result
