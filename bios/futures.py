"""`BiosFuture`: the one future type every work method returns.

It wraps a `concurrent.futures.Future` resolved by the engine (in-process) or by the HTTP
transport (remote), and can be waited on with `.result()` or awaited in asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, Generator, Generic, TypeVar

from bios.errors import APITimeoutError, BlockingCallError

T = TypeVar("T")


class BiosFuture(Generic[T]):
    """The eventual result of one request.

    `method` names the call that made it, so that a misuse can point at its `*_async` twin.
    """

    def __init__(self, inner: concurrent.futures.Future, method: str = "this call") -> None:
        self._inner = inner
        self._method = method

    @classmethod
    def completed(cls, value: T, method: str = "this call") -> "BiosFuture[T]":
        """A future that already holds `value`."""
        inner: concurrent.futures.Future = concurrent.futures.Future()
        inner.set_result(value)
        return cls(inner, method)

    def result(self, timeout: float | None = None) -> T:
        """Block until the result is ready and return it, or raise the request's `BiosError`.

        Raises APITimeoutError after `timeout` seconds, and BlockingCallError when called from
        inside a running event loop (use `await future` or the `*_async` method there).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            if not self._inner.done():
                raise BlockingCallError(
                    f"{self._method}: .result() would block the running event loop; "
                    f"use `await` on the future or call {self._method}_async instead"
                )
        try:
            return self._inner.result(timeout)
        except concurrent.futures.TimeoutError:
            raise APITimeoutError(f"{self._method}: no result within {timeout} s") from None

    async def result_async(self, timeout: float | None = None) -> T:
        """Await the result (at most `timeout` seconds)."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self._inner), timeout)
        except asyncio.TimeoutError:
            raise APITimeoutError(f"{self._method}: no result within {timeout} s") from None

    def done(self) -> bool:
        return self._inner.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The request's error, None if it succeeded; waits like `result`."""
        try:
            return self._inner.exception(timeout)
        except concurrent.futures.TimeoutError:
            raise APITimeoutError(f"{self._method}: no result within {timeout} s") from None

    def add_done_callback(self, fn: Callable[["BiosFuture[T]"], object]) -> None:
        """Call `fn(self)` once the future is done (at once if it already is)."""
        self._inner.add_done_callback(lambda _inner: fn(self))

    def __await__(self) -> Generator[object, None, T]:
        return asyncio.wrap_future(self._inner).__await__()

    def __repr__(self) -> str:
        state = "done" if self._inner.done() else "pending"
        return f"<BiosFuture {self._method} {state}>"
