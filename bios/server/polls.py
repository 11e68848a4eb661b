"""Long-polls: clients waiting on the event loop for the answers of their requests.

A poll is a coroutine on the loop the service is attached to, so thousands of waiting clients
hold no thread; the service's answer writer wakes them from its own thread. How many polls
wait (for one request, or in all) is public, and every change of that number is announced on
the service's condition variable, so that an observer waits for a state instead of sleeping.
"""

from __future__ import annotations

import asyncio
import threading


class Polls:
    """The waiting polls, by request id. `wait` runs on the attached loop; `wake`, `waiting`
    from any thread. `changed` is notified whenever a poll starts or stops waiting."""

    def __init__(self, changed: threading.Condition) -> None:
        self._changed = changed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake polls on `loop` from now on (before, `wake` does nothing)."""
        self._loop = loop

    async def wait(self, request_id: str, timeout: float) -> None:
        """Return once `request_id` is woken or `timeout` seconds have passed. On the loop only."""
        event = self._events.setdefault(request_id, asyncio.Event())
        self._count(request_id, +1)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            self._count(request_id, -1)

    def wake(self, request_ids: list[str]) -> None:
        """Wake every poll waiting for one of `request_ids`; from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake, request_ids)

    def waiting(self, request_id: str | None = None) -> int:
        """How many polls wait now for `request_id` (for any request if None)."""
        with self._changed:
            return self._waiting.get(request_id, 0) if request_id is not None else sum(self._waiting.values())

    def _wake(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            event = self._events.pop(request_id, None)
            if event is not None:
                event.set()

    def _count(self, request_id: str, change: int) -> None:
        with self._changed:
            count = self._waiting.get(request_id, 0) + change
            if count:
                self._waiting[request_id] = count
            else:
                del self._waiting[request_id]
            self._changed.notify_all()
