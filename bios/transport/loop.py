"""`LoopThread`: the HTTP transport's own asyncio event loop, on a daemon thread.

Every network call of the remote transport is a coroutine on this loop: a sync caller waits
for it (`wait`), an async caller on any other loop awaits it (`run`), and long-polls are tasks
on it (no thread per request). Futures of work requests are resolved on a small callback pool
(`deliver`) rather than on the loop, so that their callbacks — a retry's resend, `train`'s
chained `optim_step`, a user's callback — may make blocking calls without stalling the loop.

Imports nothing of Bios but its errors.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from bios.errors import BiosError, BlockingCallError

T = TypeVar("T")
SPAWNED_GRACE_S = 5.0
"""How long `LoopThread.close` lets spawned coroutines finish before cancelling them."""


class LoopThread:
    """An event loop running on a thread of its own, plus the `callback_threads` that resolve
    futures (a callback that waits for another request's result holds one of them)."""

    def __init__(self, name: str, callback_threads: int = 8) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=_run_forever, args=(self._loop,), name=name, daemon=True)
        self._thread.start()
        self._callbacks = concurrent.futures.ThreadPoolExecutor(callback_threads, thread_name_prefix=f"{name}-callback")
        self._closed = False
        self._spawned: set[asyncio.Task[object]] = set()

    def wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and block until it is done: its result, or its exception.
        The one blocking path of the transport (the thread that calls it waits)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise BlockingCallError(f"{self.name}: a blocking call on the transport's own loop would never return")
        future = self._schedule(coro)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise self._closed_error() from None

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro`, run on the transport's loop, from the caller's loop without blocking it.
        Cancelling the awaiting task does not cancel `coro`: a request being sent is sent."""
        future = self._schedule(coro)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if future.cancelled():  # the transport was closed, not the caller's task cancelled
                raise self._closed_error() from None
            raise

    def spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Start `coro` on the loop and return at once; its outcome is dropped, and `close` gives
        it up to `SPAWNED_GRACE_S` to finish. Safe from any thread and from finalizers (a
        closed transport drops `coro`)."""

        if self._closed:
            coro.close()
            return

        def start() -> None:
            task = self._loop.create_task(coro)
            self._spawned.add(task)
            task.add_done_callback(self._spawned.discard)

        try:
            self._loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop is closed
            coro.close()

    def task(self, coro: Coroutine[Any, Any, object]) -> None:
        """Start `coro` as a task of the loop; call it on the loop."""
        self._loop.create_task(coro)

    def deliver(self, future: concurrent.futures.Future, produce: Callable[[], object]) -> None:
        """Resolve `future` on the callback pool with `produce()`'s value, or with its error."""

        def settle() -> None:
            try:
                future.set_result(produce())
            except BaseException as exc:  # noqa: BLE001 - every failure belongs to the future
                future.set_exception(exc)

        try:
            self._callbacks.submit(settle)
        except RuntimeError:  # the pool is shut down: the transport was closed
            future.set_exception(self._closed_error())

    def close(self, cleanup: Callable[[], Awaitable[object]], *, wait: bool = True) -> None:
        """Let spawned coroutines finish (for up to SPAWNED_GRACE_S), cancel what else runs on
        the loop (waiting callers get an error saying the client was closed), await `cleanup()`,
        then stop the loop and the callback pool. With `wait`, return once the loop thread has
        ended (unless called on it); without, return at once (as a finalizer must, on whatever
        thread the garbage collector runs it). Idempotent."""
        if self._closed:
            return
        self._closed = True

        async def stop() -> None:
            if self._spawned:  # notices such as "this session has ended" still go out
                await asyncio.wait(self._spawned, timeout=SPAWNED_GRACE_S)
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await cleanup()

        def start_stopping() -> None:
            self._loop.create_task(stop()).add_done_callback(lambda _task: self._loop.stop())

        try:
            self._loop.call_soon_threadsafe(start_stopping)
        except RuntimeError:  # the loop is closed already (interpreter exit)
            pass
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self._callbacks.shutdown(wait=False)

    def _schedule(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """`coro` submitted to the loop (it runs in a copy of the caller's contextvars)."""
        if self._closed or self._loop.is_closed():
            coro.close()
            raise self._closed_error()
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _closed_error(self) -> BiosError:
        return BiosError(f"{self.name}: the client was closed; create a new ServiceClient")


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()
