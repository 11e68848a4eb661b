"""The simulator's device timeline (passes, windows, capacity, outages) and its seeded fault draws."""

from __future__ import annotations

import pytest

from bios.simulation import FaultRates, ScheduledFault, SimulationConfig
from emulator.simulator.faults import FaultPlan
from emulator.simulator.records import Ticket
from emulator.simulator.timeline import Timeline


def test_training_requests_share_a_pass_back_to_back_until_it_is_full():
    device = Timeline(cycle_s=0.0, max_batch_tokens=100, free_memory_bytes=1e9)
    first = device.place("train", 0.0, tokens=60, memory=1.0, duration=2.0)
    second = device.place("train", 0.0, tokens=40, memory=1.0, duration=3.0)
    third = device.place("train", 0.0, tokens=1, memory=1.0, duration=1.0)  # no room: the next pass
    assert (first.index, first.started_at, first.finished_at) == (0, 0.0, 2.0)
    assert (second.index, second.started_at, second.finished_at) == (0, 2.0, 5.0)
    assert (third.index, third.started_at, third.finished_at) == (1, 5.0, 6.0)


def test_a_request_ready_after_a_pass_started_waits_for_the_next_window():
    device = Timeline(cycle_s=10.0, max_batch_tokens=None, free_memory_bytes=1e9)
    assert device.place("train", 3.0, 1, 0.0, 1.0).started_at == 10.0  # the first window boundary
    late = device.place("train", 10.5, 1, 0.0, 1.0)
    assert (late.index, late.started_at) == (1, 20.0)
    assert device.place("train", 25.0, 1, 0.0, 12.0).started_at == 30.0
    assert device.place("train", 31.0, 1, 0.0, 1.0).started_at == 50.0  # after the long pass, on a boundary


def test_memory_makes_a_request_wait_and_groups_do_not_mix():
    device = Timeline(cycle_s=0.0, max_batch_tokens=None, free_memory_bytes=10.0)
    assert device.place("sample", 0.0, 5, memory=6.0, duration=4.0, rows=2).index == 0
    assert device.rows_in_open_pass("sample", 0.0) == 2
    squeezed = device.place("sample", 0.0, 5, memory=6.0, duration=1.0, rows=1)  # 12 bytes > 10: waits
    assert (squeezed.index, squeezed.started_at) == (1, 4.0)
    beside = device.place("sample", 4.0, 5, memory=4.0, duration=1.5, rows=1)  # decodes beside it
    assert (beside.index, beside.started_at, beside.finished_at) == (1, 4.0, 5.5)
    assert device.place("train", 0.0, 5, 0.0, 1.0).index == 2  # another group never joins
    assert [p.requests for p in device.spans()] == [1, 2, 1]


def test_an_outage_holds_every_later_pass():
    device = Timeline(cycle_s=0.0, max_batch_tokens=None, free_memory_bytes=1e9)
    device.place("train", 0.0, 1, 0.0, 1.0)
    device.outage(1.0, 31.0)
    after = device.place("train", 0.0, 1, 0.0, 1.0)
    assert (after.index, after.started_at) == (1, 31.0)


def _ticket(seq: int, attempt: int = 1, kind: str = "forward_backward") -> Ticket:
    return Ticket(lane="session-x", seq=seq, kind=kind, enqueued_at=0.0, attempt=attempt)


def test_fault_rates_are_honoured_and_draws_depend_on_the_seed_and_the_attempt():
    rates = FaultRates(transient=0.1, timeout=0.2, rate_limit=0.05, session_expiry=0.15, straggler=0.3)
    plan = FaultPlan(SimulationConfig(seed=3, faults=rates))
    draws = [plan.decide(_ticket(seq), 1, seq) for seq in range(20_000)]
    for kind, rate in (("transient", 0.1), ("timeout", 0.2), ("rate_limit", 0.05), ("session_expiry", 0.15)):
        assert sum(d.failure == kind for d in draws) / len(draws) == pytest.approx(rate, abs=0.01), kind
    assert sum(d.straggler for d in draws) / len(draws) == pytest.approx(0.3, abs=0.01)
    again = FaultPlan(SimulationConfig(seed=3, faults=rates))
    assert [again.decide(_ticket(seq), 1, seq) for seq in range(200)] == draws[:200]
    other_seed = FaultPlan(SimulationConfig(seed=4, faults=rates))
    assert [other_seed.decide(_ticket(seq), 1, seq) for seq in range(200)] != draws[:200]
    retries = [plan.decide(_ticket(seq, attempt=2), 1, seq) for seq in range(200)]
    assert retries != draws[:200]  # a retry is drawn afresh, not doomed to repeat its first try


def test_a_schedule_hits_the_nth_first_attempt_of_a_kind_only():
    plan = FaultPlan(
        SimulationConfig(
            schedule=(
                ScheduledFault(kind="transient", request="optim_step", nth=2),
                ScheduledFault(kind="restart", request="any", nth=4),
            )
        )
    )
    kinds = ["forward_backward", "optim_step", "forward_backward", "optim_step"]
    decisions = [plan.decide(_ticket(seq, kind=kind), 1, seq) for seq, kind in enumerate(kinds)]
    assert [d.failure for d in decisions] == [None, None, None, None]  # the restart overrides the transient
    assert [d.restart for d in decisions] == [False, False, False, True]
    assert plan.decide(_ticket(3, attempt=2, kind="optim_step"), 1, 3).restart is False  # retries are not counted
    plan = FaultPlan(SimulationConfig(schedule=(ScheduledFault(kind="transient", request="optim_step", nth=2),)))
    decisions = [plan.decide(_ticket(seq, kind=kind), 1, seq) for seq, kind in enumerate(kinds)]
    assert [d.failure for d in decisions] == [None, None, None, "transient"]
