"""What the simulator records: one span per request attempt, per device pass, per service event.

These are the simulator's whole memory of a run; the trace and the report are drawn from them.
Times are simulated seconds. Lanes are named by order of first appearance ("session 1",
"sampler 2"), never by their random ids, so a replay records identical spans.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ticket:
    """Who submitted a work item and when: lane (the session id of ordered requests, the
    sampler id of a snapshot's), seq (its number in the session; None for a sampler's), kind
    ("forward_backward", "optim_step" or "sample"), enqueued_at (simulated seconds), attempt
    (1, then 2, 3, ... for client retries)."""

    lane: str
    seq: int | None
    kind: str
    enqueued_at: float
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class Timing:
    """When one work item was queued, started and answered (simulated seconds)."""

    enqueued_at: float
    started_at: float
    finished_at: float


OUTCOMES = ("ok", "transient", "timeout", "rate_limit", "session_expiry", "restart")
"""How an attempt ended: answered, or the fault that hit it ("restart": lost in flight to a restart)."""


@dataclass(frozen=True, slots=True)
class RequestSpan:
    """One request attempt: queued at `enqueued_at`, on the device from `started_at`, answered
    at `finished_at` (for a refused attempt, started == finished == when it was refused)."""

    kind: str  # "forward_backward" | "optim_step" | "sample"
    lane: str  # display name: "session 1", "sampler 2"
    seq: int | None
    attempt: int
    enqueued_at: float
    started_at: float
    finished_at: float
    outcome: str  # one of OUTCOMES
    pass_index: int | None  # the device pass it ran in; None when it never reached the device
    tokens: int  # tokens it put through the model (prompt + generated budget for samples)
    straggler: bool = False


@dataclass(frozen=True, slots=True)
class PassSpan:
    """One device pass: a batch of requests of one kind group run together on every device."""

    index: int
    group: str  # "train" (forward_backward, optim_step) | "sample"
    started_at: float
    finished_at: float
    requests: int
    tokens: int


@dataclass(frozen=True, slots=True)
class ServiceEvent:
    """Something that happened to the whole service, e.g. a restart (device down meanwhile)."""

    name: str
    started_at: float
    finished_at: float
