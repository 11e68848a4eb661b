"""The engine's one hook for a layer around it: admit each request, settle each answer.

The engine orders and batches requests; a layer around it (the service simulator is one) may
see every request before it is queued and every outcome before its caller does, through one
`RequestHook`:

- `admit(request)` runs in the submitting thread. It may refuse the request by raising a
  `BiosError` (nothing has changed then), hand back the future the caller will wait on (a
  simulator's carries timing on its own clock), or answer the request itself (`answered`):
  its sequence number is then used up without running anything.
- `settle(request, future, outcome)` runs once the request has run, before `future` is
  resolved. It may stamp the future and replace the outcome (e.g. an answer that a simulated
  timeout lost becomes a retryable error, whose retry the hook then answers in `admit`).

`DIRECT` is the hook of an engine with no layer around it. Contract layer: imports only the
standard library and `bios.backend`, `bios.clock`, `bios.errors`.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Literal, Protocol

from bios.backend import ForwardBackwardWork, OptimStepWork, SampleWork
from bios.clock import REAL_CLOCK, Clock
from bios.errors import BiosError

BackendWork = ForwardBackwardWork | OptimStepWork | SampleWork
"""A work item that a backend's batched methods take."""

Kind = Literal["forward_backward", "optim_step", "sample", "call"]
"""What a request does: one of the backend's batched methods, or a call run on the engine's thread."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the hook sees it.

    lane: the session id of an ordered request, the sampler id of a snapshot's, None for the
    engine's own calls; seq: its number in the session (None outside one); work: the backend
    work item (None for a call, which runs on the engine's thread and never reaches a backend).
    """

    lane: str | None
    seq: int | None
    kind: Kind
    work: BackendWork | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request ended, before its caller hears of it: `value` (the public result) when
    `error` is None. `applied`: whether it changed anything; a retryable error that changed
    nothing leaves an ordered request's sequence number open for its retry."""

    value: object = None
    error: BiosError | None = None
    applied: bool = True


@dataclass(frozen=True, slots=True)
class Admission:
    """What `admit` decided: the `future` the caller waits on; with `answered`, the hook has
    already resolved it, and the request must not run (its sequence number is used up)."""

    future: concurrent.futures.Future[object]
    answered: bool = False


class RequestHook(Protocol):
    """A layer around the engine (see the module docstring). Methods may be called from any
    thread; `settle` is called from the engine's worker (or, `inline`, the submitting thread)."""

    @property
    def clock(self) -> Clock:
        """The clock the engine's answers are timed on; clients back off on it."""
        ...

    @property
    def inline(self) -> bool:
        """True when the engine should run requests in the submitting thread, in submission
        order, with no worker (a deterministic replay)."""
        ...

    def admit(self, request: Request) -> Admission:
        """Admit `request` (raise a `BiosError` to refuse it, changing nothing)."""
        ...

    def settle(self, request: Request, future: concurrent.futures.Future[object], outcome: Outcome) -> Outcome:
        """The outcome `future` is resolved with (`outcome` itself when the hook has nothing to add)."""
        ...


class DirectHook:
    """No layer: requests are queued as they come, answered as they end, on real time."""

    @property
    def clock(self) -> Clock:
        return REAL_CLOCK

    @property
    def inline(self) -> bool:
        return False

    def admit(self, request: Request) -> Admission:
        return Admission(concurrent.futures.Future())

    def settle(self, request: Request, future: concurrent.futures.Future[object], outcome: Outcome) -> Outcome:
        return outcome


DIRECT = DirectHook()
