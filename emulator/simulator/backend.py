"""`SimulatedBackend`: any backend behind a virtual clock, a cost model and seeded faults.

The arithmetic is the wrapped backend's, untouched: every answer is exactly what it computed.
What is simulated is when answers come and which ones fail:

- The simulation's hook (emulator.simulator.hook) admits each request with a `Ticket` (lane,
  sequence number, attempt, enqueue time on the virtual clock). Admission refuses, changing
  nothing, a request that could never fit the simulated deployment (memory, or more tokens
  than a pass holds).
- When the engine hands a batch over, every request is drawn its faults (`FaultPlan`), placed
  on the device `Timeline` with its duration from the `CostModel`, and answered; its `Timing`
  and whether its answer was lost are kept for the hook (`take_timing`, `take_lost`).
- Faults: `rate_limit` (429 at arrival) and `session_expiry` (the session's heartbeats were
  missed: it is evicted and restored from its acknowledged state) answer at once and run
  nothing; `transient` takes its device time, then fails having applied nothing; `timeout`
  runs and is applied, but its answer is lost and the client hears 408 when
  it gives up; a `straggler` is slow; a `restart` takes the service down while the request is
  in flight: the request is lost, and every adapter is rebuilt from what was acknowledged —
  its last exported state plus the gradients of acknowledged forward_backwards, replayed.
- Everything is recorded (`records`), for the trace and the report.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bios.backend import (
    AdapterSpec,
    AdapterState,
    Backend,
    ForwardBackwardWork,
    OptimStepWork,
    ResultCallback,
    SampleWork,
)
from bios.catalog import Catalog
from bios.clock import VirtualClock
from bios.errors import (
    APIConnectionError,
    APITimeoutError,
    BiosError,
    RateLimitError,
    ServiceUnavailableError,
    SessionExpiredError,
)
from bios.simulation import SimulationConfig, SimulationReport
from emulator.simulator import profiles
from emulator.simulator.costs import CostModel, DeviceGroup
from emulator.simulator.faults import Decision, FaultPlan
from emulator.simulator.footprint import check_fits, device_seconds, footprint
from emulator.simulator.records import RequestSpan, ServiceEvent, Ticket, Timing
from emulator.simulator.report import build_report
from emulator.simulator.timeline import Timeline
from emulator.simulator.trace import write_trace


@dataclass(slots=True)
class _Admission:
    """A request admitted and waiting for the device: what it costs and what will hit it."""

    ticket: Ticket
    lane: str
    group: str
    tokens: int
    memory: float
    rows: int
    decision: Decision


class SimulatedBackend:
    """Wraps `inner` (any Backend) per `config`; `catalog` resolves the models requests name."""

    def __init__(self, inner: Backend, config: SimulationConfig, catalog: Catalog) -> None:
        self.inner = inner
        self.name = inner.name
        self.checkpoint_format = getattr(inner, "checkpoint_format", "safetensors")
        self.config = config
        self.clock = VirtualClock(config.time_scale)
        self.deterministic = config.time_scale == 0
        hardware = profiles.hardware(config.hardware)
        self.group = DeviceGroup(hardware, config.devices, profiles.efficiency(config, hardware))
        self._catalog = catalog
        self._costs: dict[str, CostModel] = {}
        if config.model is not None:  # refuse an unknown projected model now, not at the first request
            profiles.projection_model(config.model, catalog, None)  # type: ignore[arg-type]
        self._plan = FaultPlan(config)
        self._timeline: Timeline | None = None
        self._admitted: dict[int, tuple[object, _Admission]] = {}
        self._lanes: dict[str, str] = {}
        self._positions: dict[str, int] = {}
        self._lane_free: dict[str, float] = {}
        self._adapters: dict[str, AdapterSpec] = {}
        self._unsettled: dict[str, list[ForwardBackwardWork]] = {}
        self._timings: dict[int, tuple[Ticket, Timing]] = {}
        """id(work) → its ticket and timing, from its answer until the hook takes them."""
        self._lost: dict[int, BiosError] = {}
        """id(work) → the error its caller hears instead of the answer, which was lost."""
        self.spans: list[RequestSpan] = []
        self.events: list[ServiceEvent] = []
        self._lock = threading.Lock()

    # ---- costs ----------------------------------------------------------------------------------

    def costs(self, base_model: str) -> CostModel:
        """The cost model for requests naming `base_model` (the profile's projected model, if set)."""
        if base_model not in self._costs:
            model = profiles.projection_model(self.config.model, self._catalog, self._catalog.get(base_model))
            self._costs[base_model] = CostModel(self.group, model, self.config.weight_bytes)
        return self._costs[base_model]

    def _base_model(self, work: object) -> str:
        """The base model a work item runs on (an optim_step names only its adapter)."""
        if isinstance(work, OptimStepWork):
            return self._adapters[work.adapter_id].base_model
        if isinstance(work, ForwardBackwardWork | SampleWork):
            return work.base_model
        raise TypeError(f"not a work item: {type(work).__name__}")

    def _device(self, costs: CostModel) -> Timeline:
        if self._timeline is None:
            self._timeline = Timeline(self.config.cycle_s, self.config.max_batch_tokens, costs.free_memory_bytes)
        return self._timeline

    # ---- admission ------------------------------------------------------------------------------

    def admit(self, work: object, ticket: Ticket) -> None:
        """Stamp `work` with `ticket`; InvalidRequestError when it could never run on this deployment."""
        costs = self.costs(self._base_model(work))
        group, tokens, memory, rows = footprint(work, costs)
        check_fits(ticket.kind, tokens, memory, costs, self.config.max_batch_tokens)
        with self._lock:
            lane = self._lane_name(ticket.lane)
            position = ticket.seq if ticket.seq is not None else self._next_position(ticket)
            decision = self._plan.decide(ticket, int(lane.split()[-1]), position)
            self._admitted[id(work)] = (work, _Admission(ticket, lane, group, tokens, memory, rows, decision))

    def answered_from_record(self, ticket: Ticket) -> None:
        """Record a retry of a request whose answer was lost, which the hook answers from its record, at once."""
        with self._lock:
            lane = self._lane_name(ticket.lane)
        at = ticket.enqueued_at
        self.spans.append(RequestSpan(ticket.kind, lane, ticket.seq, ticket.attempt, at, at, at, "ok", None, 0))
        self._lane_free[ticket.lane] = at

    def _lane_name(self, lane_id: str) -> str:
        if lane_id not in self._lanes:
            self._lanes[lane_id] = (
                f"{'session' if lane_id.startswith('session-') else 'sampler'} {len(self._lanes) + 1}"
            )
        return self._lanes[lane_id]

    def _next_position(self, ticket: Ticket) -> int:
        """The place of an unordered request in its lane (a retry keeps its first attempt's place)."""
        position = self._positions.get(ticket.lane, -1) + (1 if ticket.attempt == 1 else 0)
        self._positions[ticket.lane] = position
        return position

    # ---- adapters -------------------------------------------------------------------------------

    def create_adapter(self, spec: AdapterSpec, state: AdapterState | None = None) -> None:
        self.inner.create_adapter(spec, state)
        self._adapters[spec.adapter_id] = spec
        self._unsettled[spec.adapter_id] = []

    def delete_adapter(self, adapter_id: str) -> None:
        self.inner.delete_adapter(adapter_id)
        self._adapters.pop(adapter_id, None)
        self._unsettled.pop(adapter_id, None)

    def export_state(self, adapter_id: str) -> AdapterState:
        return self.inner.export_state(adapter_id)

    def _rebuild(self, adapter_id: str) -> None:
        """Evict `adapter_id` and restore it from what was acknowledged: its exported state, then
        the gradients of its acknowledged forward_backwards since the last optim_step, replayed."""
        state = self.inner.export_state(adapter_id)
        self.inner.delete_adapter(adapter_id)
        self.inner.create_adapter(state.spec, state)
        for work in self._unsettled.get(adapter_id, []):
            self.inner.forward_backward([work])

    # ---- batched work ---------------------------------------------------------------------------

    def forward_backward(
        self, work: Sequence[ForwardBackwardWork], on_result: ResultCallback | None = None
    ) -> list[object]:
        return self._run(work, self.inner.forward_backward, on_result)

    def optim_step(self, work: Sequence[OptimStepWork], on_result: ResultCallback | None = None) -> list[object]:
        return self._run(work, self.inner.optim_step, on_result)

    def sample(self, work: Sequence[SampleWork], on_result: ResultCallback | None = None) -> list[object]:
        return self._run(work, self.inner.sample, on_result)

    def _run(
        self, works: Sequence[object], compute: Callable[..., list], on_result: ResultCallback | None
    ) -> list[object]:
        """Fault, run (what runs) in one call of the wrapped backend, place and stamp every item."""
        with self._lock:
            admissions = [self._admitted.pop(id(w), (w, None))[1] for w in works]
        lost_from = self._restart_index(admissions)
        runs = [i for i, a in enumerate(admissions) if _runs(a) and (lost_from is None or i < lost_from)]
        outputs = dict(zip(runs, compute([works[i] for i in runs]) if runs else [], strict=True))
        answers: list[object] = []
        for i, (work, admission) in enumerate(zip(works, admissions, strict=True)):
            if admission is None:
                answers.append(outputs.get(i))
            elif lost_from is not None and i >= lost_from:
                answers.append(self._lost_in_restart(work, admission))
            else:
                answers.append(self._answer(work, admission, outputs.get(i)))
        self._deliver(works, answers, on_result)
        return answers

    def take_timing(self, work: object) -> tuple[Ticket, Timing] | None:
        """The ticket and timing of `work`'s answer (once; None if it was never admitted)."""
        with self._lock:
            return self._timings.pop(id(work), None)

    def take_lost(self, work: object) -> BiosError | None:
        """The error heard instead of `work`'s answer when that answer was lost (once), else None."""
        with self._lock:
            return self._lost.pop(id(work), None)

    def _restart_index(self, admissions: list[_Admission | None]) -> int | None:
        """The index of the first item the service restarts under (it and those after are lost)."""
        for i, admission in enumerate(admissions):
            if admission is not None and admission.decision.restart:
                return i
        return None

    def _answer(self, work: object, admission: _Admission, output: object) -> object:
        """Place one item on the device and answer it as its fault (if any) dictates."""
        ticket, failure = admission.ticket, admission.decision.failure
        ready = max(ticket.enqueued_at, self._lane_free.get(ticket.lane, 0.0))
        if failure in ("rate_limit", "session_expiry"):
            adapter_id = work.adapter_id if isinstance(work, ForwardBackwardWork | OptimStepWork | SampleWork) else None
            if failure == "session_expiry" and adapter_id is not None and adapter_id in self._adapters:
                self._rebuild(adapter_id)
            return self._record(work, admission, None, ready, ready, _refusal(failure, self.config))
        costs = self.costs(self._base_model(work))
        batch_rows = self._device(costs).rows_in_open_pass(admission.group, ready) + admission.rows
        duration = device_seconds(work, output, costs, self._adapters, batch_rows)
        if admission.decision.straggler:
            duration *= self.config.straggler_factor
        place = self._device(costs).place(
            admission.group, ready, admission.tokens, admission.memory, duration, admission.rows
        )
        if failure == "transient":
            error: BiosError = ServiceUnavailableError(
                f"{ticket.kind}: the service failed transiently while "
                "running this request; nothing was applied, retry it"
            )
            return self._record(work, admission, place.index, place.started_at, place.finished_at, error)
        self._settle(work, output)
        if failure == "timeout":
            answered = max(place.finished_at, ticket.enqueued_at + self.config.request_timeout_s)
            error = APITimeoutError(
                f"{ticket.kind}: no answer within {self.config.request_timeout_s:g} "
                "s; it may have run — retry with the same sequence number"
            )
            if isinstance(output, BiosError):  # it failed anyway: nothing was applied, the timeout is all they hear
                return self._record(work, admission, place.index, place.started_at, answered, error)
            with self._lock:
                self._lost[id(work)] = error
            return self._record(work, admission, place.index, place.started_at, answered, output)
        return self._record(work, admission, place.index, place.started_at, place.finished_at, output)

    def _lost_in_restart(self, work: object, admission: _Admission) -> object:
        """The service goes down when this item reaches the device: every adapter is rebuilt
        from its acknowledged state and the item is lost (if it is the restarting one, the
        outage begins with it)."""
        ready = max(admission.ticket.enqueued_at, self._lane_free.get(admission.ticket.lane, 0.0))
        device = self._timeline
        down_at = max(ready, device.free_at if device is not None else 0.0)
        if admission.decision.restart and not any(e.started_at == down_at for e in self.events):
            self.events.append(ServiceEvent("restart", down_at, down_at + self.config.restart_s))
            if device is not None:
                device.outage(down_at, down_at + self.config.restart_s)
            for adapter_id in list(self._adapters):
                self._rebuild(adapter_id)
        error = APIConnectionError(
            f"{admission.ticket.kind}: the service restarted while this "
            "request was in flight; nothing of it was applied, retry it"
        )
        return self._record(work, admission, None, down_at, down_at, error)

    def _settle(self, work: object, output: object) -> None:
        """Track what a restart must replay: backward passes since the adapter's last optim_step."""
        if isinstance(output, BiosError):
            return
        if isinstance(work, ForwardBackwardWork) and work.backward and work.adapter_id in self._unsettled:
            self._unsettled[work.adapter_id].append(work)
        elif isinstance(work, OptimStepWork) and work.adapter_id in self._unsettled:
            self._unsettled[work.adapter_id] = []

    def _record(
        self,
        work: object,
        admission: _Admission,
        pass_index: int | None,
        started: float,
        answered: float,
        value: object,
    ) -> object:
        """Record the attempt's span and keep its timing for the hook; returns `value`."""
        ticket = admission.ticket
        outcome = "ok" if admission.decision.failure is None else admission.decision.failure
        if isinstance(value, APIConnectionError):
            outcome = "restart"
        self.spans.append(
            RequestSpan(
                ticket.kind,
                admission.lane,
                ticket.seq,
                ticket.attempt,
                ticket.enqueued_at,
                started,
                answered,
                outcome,
                pass_index,
                admission.tokens,
                admission.decision.straggler,
            )
        )
        if ticket.seq is not None:
            self._lane_free[ticket.lane] = answered
        with self._lock:
            self._timings[id(work)] = (ticket, Timing(ticket.enqueued_at, started, answered))
        return value

    def _deliver(self, works: Sequence[object], answers: list[object], on_result: ResultCallback | None) -> None:
        """In scaled real time, hand each answer over when its simulated time has come."""
        if self.clock.jumps or on_result is None:
            return
        finished = {i: timing[1].finished_at for i, w in enumerate(works) if (timing := self._timings.get(id(w)))}
        for i in sorted(finished, key=finished.__getitem__):
            self.clock.advance_to(finished[i])
            on_result(i, answers[i])

    # ---- the run --------------------------------------------------------------------------------

    def report(self) -> SimulationReport:
        """The run so far; writes the trace file when the configuration names one."""
        model = self.config.model or ", ".join(sorted(self._costs)) or "no model"
        passes = self._timeline.spans() if self._timeline is not None else []
        if self.config.trace:
            write_trace(
                self.config.trace,
                self.spans,
                passes,
                self.events,
                devices=self.config.devices,
                title=f"bios simulation: {model}",
            )
        return build_report(
            self.spans, passes, self.events, hardware=self.group.hardware.name, devices=self.config.devices, model=model
        )

    def close(self) -> None:
        self.inner.close()


def _runs(admission: _Admission | None) -> bool:
    """Whether the wrapped backend computes this item (refused and transient items never run)."""
    return admission is None or admission.decision.failure not in ("rate_limit", "session_expiry", "transient")


def _refusal(failure: str, config: SimulationConfig) -> BiosError:
    if failure == "rate_limit":
        return RateLimitError(
            f"rate limited: too many requests; retry after {config.retry_after_s:g} s", retry_after=config.retry_after_s
        )
    return SessionExpiredError(
        "session_id: the session missed its heartbeats and was evicted; nothing was applied, retry to restore it"
    )
