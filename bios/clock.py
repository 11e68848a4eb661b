"""Clocks: the real one, and the simulator's virtual one.

Everything in Bios that waits on time (client retry backoff, request timestamps) asks a
`Clock`, so that under the service simulator the same code runs on simulated time. A
`VirtualClock` with `time_scale` 0 never sleeps: it jumps. Its time advances only when a
client waits for a result (to that result's simulated finish) or a retry backs off, so a
single-threaded training loop sees the same simulated times on every run.

Contract layer: imports only the standard library.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    @property
    def time_scale(self) -> float | None:
        """None for real time; for simulated time, real seconds per simulated second (0: jumps)."""
        ...

    def now(self) -> float:
        """Seconds since the clock started."""
        ...

    def advance_to(self, t: float) -> None:
        """Return once time `t` has come (a virtual clock jumps there; a real one sleeps)."""
        ...

    def call_at(self, t: float, fn: Callable[[], object]) -> None:
        """Run `fn` once time `t` has come (at once, in this thread, on a virtual clock that does
        not sleep; on a timer thread otherwise)."""
        ...


class RealClock:
    """Wall-clock time (monotonic), from this clock's creation."""

    def __init__(self) -> None:
        self._origin = time.monotonic()

    @property
    def time_scale(self) -> None:
        return None

    def now(self) -> float:
        return time.monotonic() - self._origin

    def advance_to(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)

    def call_at(self, t: float, fn: Callable[[], object]) -> None:
        _run_after(t - self.now(), fn)


class VirtualClock:
    """Simulated seconds. `time_scale` 0: jumps, never sleeps, and only moves forward when
    told to; `time_scale` s > 0: one simulated second lasts s real seconds and time flows on
    its own (for testing a client's real timeouts and heartbeats)."""

    def __init__(self, time_scale: float = 0.0) -> None:
        if time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        self._scale = time_scale
        self._now = 0.0
        self._origin = time.monotonic()
        self._lock = threading.Lock()

    @property
    def time_scale(self) -> float:
        return self._scale

    @property
    def jumps(self) -> bool:
        """True when the clock never sleeps (time_scale 0)."""
        return self.time_scale == 0

    def now(self) -> float:
        if self.jumps:
            with self._lock:
                return self._now
        return (time.monotonic() - self._origin) / self.time_scale

    def advance_to(self, t: float) -> None:
        if self.jumps:
            with self._lock:
                self._now = max(self._now, t)
            return
        delay = (t - self.now()) * self.time_scale
        if delay > 0:
            time.sleep(delay)

    def call_at(self, t: float, fn: Callable[[], object]) -> None:
        if self.jumps:
            fn()
        else:
            _run_after((t - self.now()) * self.time_scale, fn)


def _run_after(delay: float, fn: Callable[[], object]) -> None:
    """`fn()` at once when `delay` (real seconds) is not positive, else on a daemon timer thread."""
    if delay <= 0:
        fn()
        return
    timer = threading.Timer(delay, fn)
    timer.daemon = True
    timer.start()


REAL_CLOCK = RealClock()


@dataclass(frozen=True, slots=True)
class Attempt:
    """How a client is submitting a request right now: which try it is (1 = the first) and,
    for a retry after a backoff, the clock time it is sent at."""

    number: int = 1
    sent_at: float | None = None


_ATTEMPT: contextvars.ContextVar[Attempt] = contextvars.ContextVar("bios_attempt", default=Attempt())  # noqa: B039 - Attempt is frozen


@contextlib.contextmanager
def attempt(number: int, sent_at: float | None) -> Iterator[None]:
    """Within this block, requests submitted by this thread are attempt `number`, sent at `sent_at`."""
    token = _ATTEMPT.set(Attempt(number, sent_at))
    try:
        yield
    finally:
        _ATTEMPT.reset(token)


def current_attempt() -> Attempt:
    """The attempt the submitting code declared with `attempt(...)` (the first, sent now, if none)."""
    return _ATTEMPT.get()
