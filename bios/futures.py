"""`BiosFuture`: the one future type every work method returns.

It wraps a `concurrent.futures.Future` resolved by the engine (in-process) or by the HTTP
transport (remote), and can be waited on with `.result()` or awaited in asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import weakref
from collections.abc import Callable, Generator
from typing import Generic, Self, TypeVar

from bios.clock import Clock
from bios.errors import APITimeoutError
from bios.types import RequestTiming

T = TypeVar("T")
log = logging.getLogger(__name__)


def pinned(future: concurrent.futures.Future[T], owner: object) -> concurrent.futures.Future[T]:
    """`future`, holding a reference to `owner` until it is done (so a client whose garbage
    collection ends its session or snapshot outlives its requests)."""

    def keep(_done: concurrent.futures.Future[T], owner: object = owner) -> None:
        pass

    future.add_done_callback(keep)
    return future


class TimedFuture(concurrent.futures.Future[object]):
    """A future that also says when its request was queued, started and answered: `timing`,
    set before it resolves, in seconds on `clock` (a simulated clock under the service simulator)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.timing: RequestTiming | None = None


def settle_clock(future: concurrent.futures.Future[object]) -> None:
    """A client has waited for `future`: under the service simulator, its simulated clock moves
    to the time the answer arrived (futures without timing leave every clock alone)."""
    if isinstance(future, TimedFuture) and future.timing is not None:
        future.clock.advance_to(future.timing.finished_at)


def unsettled(future: BiosFuture[T]) -> concurrent.futures.Future:
    """The request's own future under `future`, for chaining inside the client: waiting on it
    does not move a simulated clock (only a user's wait on a `BiosFuture` does)."""
    return future._inner


class BiosFuture(Generic[T]):
    """The eventual result of one request.

    `method` names the call that made it, so that a misuse can point at its `*_async` twin.
    Waiting for it (`result`, `exception`, `await`) is what moves a simulated clock forward.
    """

    def __init__(self, inner: concurrent.futures.Future, method: str = "this call") -> None:
        self._inner = inner
        self._method = method

    @classmethod
    def completed(cls, value: T, method: str = "this call") -> BiosFuture[T]:
        """A future that already holds `value`."""
        inner: concurrent.futures.Future = concurrent.futures.Future()
        inner.set_result(value)
        return cls(inner, method)

    def result(self, timeout: float | None = None) -> T:
        """Block until the result is ready and return it, or raise the request's `BiosError`.

        Raises APITimeoutError after `timeout` seconds. Inside a running event loop it still
        waits (the request runs on the engine's or the transport's own threads, never on the
        caller's loop, so this cannot deadlock) but logs a warning: the loop is stalled
        meanwhile, and `await future` would not stall it.
        """
        self._warn_if_blocking_a_running_loop()
        try:
            return self._inner.result(timeout)
        except concurrent.futures.TimeoutError:
            raise APITimeoutError(f"{self._method}: no result within {timeout} s") from None
        finally:
            if self._inner.done():
                settle_clock(self._inner)

    async def result_async(self, timeout: float | None = None) -> T:
        """Await the result (at most `timeout` seconds).

        Giving up the wait (timeout or cancellation of the awaiting task) leaves the request
        itself running: its result can still be collected later.
        """
        try:
            return await asyncio.wait_for(self._shielded(), timeout)
        except TimeoutError:
            raise APITimeoutError(f"{self._method}: no result within {timeout} s") from None

    def done(self) -> bool:
        return self._inner.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The request's error, None if it succeeded; waits like `result` (and, like it, warns
        when it stalls a running event loop)."""
        self._warn_if_blocking_a_running_loop()
        try:
            return self._inner.exception(timeout)
        except concurrent.futures.TimeoutError:
            raise APITimeoutError(f"{self._method}: no result within {timeout} s") from None
        finally:
            if self._inner.done():
                settle_clock(self._inner)

    def future(self) -> concurrent.futures.Future[T]:
        """A `concurrent.futures.Future` that completes with this request's result or error, for
        code built on the standard futures (`concurrent.futures.wait`, `as_completed`). Waiting
        on it does not move a simulated clock; cancelling it gives up that future only, not the
        request, which runs on (its result stays available here)."""
        mirror: concurrent.futures.Future[T] = concurrent.futures.Future()

        def copy_state(inner: concurrent.futures.Future) -> None:
            if not mirror.set_running_or_notify_cancel():
                return
            if inner.cancelled():
                mirror.set_exception(concurrent.futures.CancelledError())
            elif (error := inner.exception()) is not None:
                mirror.set_exception(error)
            else:
                mirror.set_result(inner.result())

        self._inner.add_done_callback(copy_state)
        return mirror

    async def coroutine(self) -> T:
        """This future as a coroutine (`asyncio.create_task(future.coroutine())`): awaits it."""
        return await self

    def _warn_if_blocking_a_running_loop(self) -> None:
        """Log a warning if this thread runs an event loop and the result is not ready."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if not self._inner.done():
            log.warning(
                "%s: .result() inside a running event loop stalls the loop until the request is "
                "done; use `await` on the future or call %s_async instead",
                self._method,
                self._method,
            )

    def add_done_callback(self, fn: Callable[[BiosFuture[T]], object]) -> None:
        """Call `fn(self)` once the future is done (at once if it already is). The callback holds
        this future weakly (a strong hold would make a reference cycle that keeps a client and
        its session alive until the garbage collector runs); if it is gone by then, `fn` gets a
        new future of the same request."""
        this, method = weakref.ref(self), self._method
        self._inner.add_done_callback(lambda inner: fn(this() or BiosFuture(inner, method)))

    def __await__(self) -> Generator[object, None, T]:
        return self._shielded().__await__()

    def _shielded(self) -> asyncio.Future[T]:
        """An asyncio future on the running loop that mirrors the inner one.

        Unlike `asyncio.wrap_future`, cancelling it (a timeout, a cancelled task) never cancels
        the inner future: the request keeps running and the engine can still resolve it.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future = loop.create_future()

        def copy_state() -> None:
            if waiter.done():
                return
            settle_clock(self._inner)
            if self._inner.cancelled():
                waiter.cancel()
            elif (error := self._inner.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(self._inner.result())

        def on_done(_inner: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(copy_state)
            except RuntimeError:  # the loop was closed after the waiter was given up
                pass

        self._inner.add_done_callback(on_done)
        return waiter

    def __repr__(self) -> str:
        state = "done" if self._inner.done() else "pending"
        return f"<BiosFuture {self._method} {state}>"


class ReadyClient:
    """A client that is also the finished future of its own making. The tinker SDK's `create_*`
    calls hand back a future of the client; Bios's hand back the client itself, which answers
    that future's calls too: `.result()`, `await client`, `.future()` and `.coroutine()` all
    give the client, so code written either way runs."""

    def result(self, timeout: float | None = None) -> Self:
        """This client (it is ready: nothing to wait for)."""
        return self

    async def result_async(self, timeout: float | None = None) -> Self:
        return self

    def future(self) -> concurrent.futures.Future[Self]:
        """A finished `concurrent.futures.Future` holding this client."""
        done: concurrent.futures.Future[Self] = concurrent.futures.Future()
        done.set_result(self)
        return done

    async def coroutine(self) -> Self:
        return self

    def __await__(self) -> Generator[object, None, Self]:
        return self.coroutine().__await__()
