"""`Simulation`: the service simulator as a layer around the engine.

It is found through the `bios.simulator` entry point and gives the engine two things: the
`SimulatedBackend` to call (the wrapped backend on simulated time, with faults), and itself as
the engine's `RequestHook` (bios.admission):

- `admit` stamps each backend request with a `Ticket` (its lane, sequence number, attempt and
  enqueue time on the virtual clock: the attempt's send time for a client's retry) and hands
  the caller a `TimedFuture` on that clock. The retry of a request whose answer was lost is
  answered here, from the record, without running again.
- `settle` stamps the answer's timing on the future (and on the result, when its type has a
  `timing` field) and turns an answer the simulated timeout lost into the retryable error the
  caller hears, keeping the answer for that retry.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import defaultdict

from pydantic import BaseModel

from bios.admission import Admission, Outcome, Request
from bios.backend import Backend
from bios.catalog import Catalog
from bios.clock import Clock, current_attempt
from bios.futures import TimedFuture
from bios.simulation import SimulationConfig, SimulationReport
from bios.types import RequestTiming
from emulator.simulator.backend import SimulatedBackend
from emulator.simulator.records import Ticket, Timing

LOST_KEPT = 1024
"""How many sequence numbers back a lost answer is kept for its retry."""


class Simulation:
    """`inner` under the simulated deployment `config`; `catalog` resolves the models requests name."""

    def __init__(self, inner: Backend, config: SimulationConfig, catalog: Catalog) -> None:
        self.backend = SimulatedBackend(inner, config, catalog)
        self._lost: dict[str, dict[int, tuple[str, object]]] = defaultdict(dict)
        """lane → seq → (kind, result) of ordered requests that ran but whose answer was lost."""
        self._lock = threading.Lock()

    @property
    def hook(self) -> Simulation:
        return self

    @property
    def clock(self) -> Clock:
        return self.backend.clock

    @property
    def inline(self) -> bool:
        return self.backend.deterministic

    def report(self) -> SimulationReport:
        """The run so far (writing the trace file, when the configuration names one)."""
        return self.backend.report()

    def admit(self, request: Request) -> Admission:
        if request.work is None or request.lane is None:  # the engine's own calls take no simulated time
            return Admission(concurrent.futures.Future())
        attempt = current_attempt()
        sent_at = self.clock.now() if attempt.sent_at is None else attempt.sent_at
        ticket = Ticket(request.lane, request.seq, request.kind, sent_at, attempt.number)
        recorded = self._recorded(request)
        if recorded is not None:
            self.backend.answered_from_record(ticket)
            future = TimedFuture(self.clock)
            future.timing = _request_timing(ticket, Timing(sent_at, sent_at, sent_at))
            future.set_result(_with_timing(recorded, future.timing))
            return Admission(future, answered=True)
        self.backend.admit(request.work, ticket)
        return Admission(TimedFuture(self.clock))

    def settle(self, request: Request, future: concurrent.futures.Future[object], outcome: Outcome) -> Outcome:
        answered = self.backend.take_timing(request.work) if request.work is not None else None
        if answered is None or not isinstance(future, TimedFuture):
            return outcome
        future.timing = _request_timing(*answered)
        lost = self.backend.take_lost(request.work)
        if lost is None:
            return outcome if outcome.error is not None else Outcome(_with_timing(outcome.value, future.timing))
        if outcome.error is None and request.lane is not None and request.seq is not None:
            self._remember(request.lane, request.seq, request.kind, outcome.value)
        return Outcome(error=lost, applied=True)

    def _recorded(self, request: Request) -> object | None:
        """The kept result of `request`'s number, if it ran as the same kind and its answer was lost."""
        if request.lane is None or request.seq is None:
            return None
        with self._lock:
            kept = self._lost[request.lane].get(request.seq)
        return kept[1] if kept is not None and kept[0] == request.kind else None

    def _remember(self, lane: str, seq: int, kind: str, result: object) -> None:
        with self._lock:
            kept = self._lost[lane]
            kept[seq] = (kind, result)
            for old in [number for number in kept if number < seq - LOST_KEPT]:
                del kept[old]


def _request_timing(ticket: Ticket, timing: Timing) -> RequestTiming:
    return RequestTiming(
        enqueued_at=timing.enqueued_at,
        started_at=timing.started_at,
        finished_at=timing.finished_at,
        attempts=ticket.attempt,
    )


def _with_timing(result: object, timing: RequestTiming | None) -> object:
    """`result` carrying `timing`, when it is a result type with a `timing` field."""
    if timing is None or not isinstance(result, BaseModel) or "timing" not in type(result).model_fields:
        return result
    return result.model_copy(update={"timing": timing})
