"""The simulated device: one queue of passes, each a batch of requests run on every device.

Passes run back to back. A new pass starts at the first multiple of the batching window
(`cycle_s`; 0 means at once) that is no earlier than both the moment its first request is
ready and the end of the previous pass. A request joins the last pass instead when that pass
is of its group ("train" or "sample"), does not start before the request is ready, and has
room for its tokens and memory. Within a training pass requests run one after another; within
a sampling pass they decode side by side, each finishing after its own duration. A service
outage (a restart) holds every later pass until it is over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from emulator.simulator.records import PassSpan


@dataclass(slots=True)
class _Pass:
    index: int
    group: str
    started_at: float
    finished_at: float
    requests: int = 0
    tokens: int = 0
    memory: float = 0.0
    rows: int = 0

    def span(self) -> PassSpan:
        return PassSpan(self.index, self.group, self.started_at, self.finished_at, self.requests, self.tokens)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request ran: pass `index`, on the device from `started_at` to `finished_at`."""

    index: int
    started_at: float
    finished_at: float


class Timeline:
    """Places requests on the device, in the order they reach it (see the module docstring)."""

    def __init__(self, cycle_s: float, max_batch_tokens: int | None, free_memory_bytes: float) -> None:
        self.cycle_s = cycle_s
        self.max_batch_tokens = max_batch_tokens
        self.free_memory_bytes = free_memory_bytes
        self._passes: list[_Pass] = []
        self._down_until = 0.0

    @property
    def free_at(self) -> float:
        """When the device has finished every pass placed so far (or is back from an outage)."""
        last = self._passes[-1].finished_at if self._passes else 0.0
        return max(last, self._down_until)

    def rows_in_open_pass(self, group: str, ready: float) -> int:
        """Sampling rows already decoding in the pass a `group` request ready at `ready` would join."""
        last = self._joinable(group, ready, tokens=0, memory=0.0)
        return last.rows if last is not None else 0

    def place(self, group: str, ready: float, tokens: int, memory: float, duration: float, rows: int = 0) -> Placement:
        """Run a request of `group` that is ready at `ready` and takes `duration` seconds."""
        current = self._joinable(group, ready, tokens, memory)
        if current is None:
            start = self._boundary(max(ready, self.free_at))
            current = _Pass(len(self._passes), group, start, start)
            self._passes.append(current)
        if group == "sample":
            started = current.started_at
            finished = started + duration
        else:
            started = current.finished_at
            finished = started + duration
        current.finished_at = max(current.finished_at, finished)
        current.requests += 1
        current.tokens += tokens
        current.memory += memory
        current.rows += rows
        return Placement(current.index, started, finished)

    def outage(self, start: float, end: float) -> None:
        """The service is down from `start` to `end`: no pass starts before `end`."""
        self._down_until = max(self._down_until, end)

    def spans(self) -> list[PassSpan]:
        return [p.span() for p in self._passes]

    def _joinable(self, group: str, ready: float, tokens: int, memory: float) -> _Pass | None:
        if not self._passes:
            return None
        last = self._passes[-1]
        if last.group != group or last.started_at < ready or last.started_at < self._down_until:
            return None
        if self.max_batch_tokens is not None and last.tokens + tokens > self.max_batch_tokens:
            return None
        if last.memory + memory > self.free_memory_bytes:
            return None
        return last

    def _boundary(self, t: float) -> float:
        """The first multiple of the batching window at or after `t`."""
        if self.cycle_s <= 0:
            return t
        return math.ceil(t / self.cycle_s - 1e-9) * self.cycle_s
