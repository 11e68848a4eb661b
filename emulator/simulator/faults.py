"""Seeded faults: which request attempt is hit by what, decided from one seed.

Each attempt gets its own random draws, keyed by (seed, lane, position in the lane, attempt,
kind) rather than taken from one shared stream, so the faults that hit a request do not depend
on what other sessions did. One uniform draw picks at most one failure kind (their rates add
up, in `bios.simulation.FAILURE_KINDS` order); a second decides whether the attempt straggles.
A schedule adds faults at chosen requests ("the 3rd optim_step"), counted over first attempts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from bios.simulation import FAILURE_KINDS, SimulationConfig
from emulator.simulator.records import Ticket

_KIND_CODES = {"forward_backward": 1, "optim_step": 2, "sample": 3}


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens to one attempt: `failure` (a FAILURE_KINDS name or None), whether it is a
    `straggler`, and whether the service `restart`s while it is in flight."""

    failure: str | None = None
    straggler: bool = False
    restart: bool = False


class FaultPlan:
    """Draws the faults of every attempt of a run from `config.seed`, `config.faults` and `config.schedule`."""

    def __init__(self, config: SimulationConfig) -> None:
        self.seed = config.seed
        self.rates = config.faults
        self.schedule = config.schedule
        self._first_attempts: Counter[str] = Counter()

    def decide(self, ticket: Ticket, lane_index: int, position: int) -> Decision:
        """The faults of `ticket`'s attempt; `lane_index` and `position` name it independently
        of random ids (the lane's order of appearance, and the request's place in the lane)."""
        rng = np.random.default_rng([self.seed, lane_index, position, ticket.attempt, _KIND_CODES.get(ticket.kind, 0)])
        failure_draw, straggler_draw = rng.random(2)
        failure = self._failure(failure_draw)
        straggler = bool(straggler_draw < self.rates.straggler)
        restart = False
        for kind in self._scheduled(ticket):
            if kind == "straggler":
                straggler = True
            elif kind == "restart":
                restart = True
            else:
                failure = kind
        return Decision(
            None if restart else failure, straggler, restart
        )  # a restart loses the attempt whatever else was drawn

    def _failure(self, draw: float) -> str | None:
        edge = 0.0
        for kind in FAILURE_KINDS:
            edge += getattr(self.rates, kind)
            if draw < edge:
                return kind
        return None

    def _scheduled(self, ticket: Ticket) -> list[str]:
        """Scheduled fault kinds hitting this attempt (only first attempts are counted and hit)."""
        if ticket.attempt != 1:
            return []
        self._first_attempts[ticket.kind] += 1
        self._first_attempts["any"] += 1
        return [
            fault.kind
            for fault in self.schedule
            if fault.request in (ticket.kind, "any") and self._first_attempts[fault.request] == fault.nth
        ]
