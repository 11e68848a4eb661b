"""The simulator's trace file and report, on small hand-made records with known answers: lane
rows in order of first appearance, microsecond rounding, queued slices only when waiting,
failure markers, one row per device, byte-identical files; report counts, wall and union-busy
time, cost figures and the printed lines."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from emulator.simulator.records import PassSpan, RequestSpan, ServiceEvent
from emulator.simulator.report import build_report, busy_seconds, duration, significant
from emulator.simulator.trace import chrome_trace, lane_tids, microseconds, write_trace


def span(kind: str, lane: str, enqueued: float, started: float, finished: float, **changes: object) -> RequestSpan:
    """An "ok" first attempt of `kind` on `lane`; `changes` overrides any other field."""
    fields: dict[str, object] = {"seq": 1, "attempt": 1, "outcome": "ok", "pass_index": 0, "tokens": 10}
    fields.update(changes)
    return RequestSpan(kind=kind, lane=lane, enqueued_at=enqueued, started_at=started, finished_at=finished, **fields)


def train_pass(index: int, started: float, finished: float, group: str = "train") -> PassSpan:
    return PassSpan(index=index, group=group, started_at=started, finished_at=finished, requests=1, tokens=100)


# Listed out of order: "sampler 2" comes first in the list, "session 1" is enqueued first.
SPANS = [
    span("sample", "sampler 2", 0.2, 0.2, 0.2, outcome="rate_limit", pass_index=None, seq=None),
    span("forward_backward", "session 1", 0.0, 0.5, 1.5, tokens=100),
    span("optim_step", "session 1", 1.5, 1.5, 2.0, seq=2, outcome="restart", pass_index=None),
    span("sample", "sampler 2", 2.2, 2.5, 3.0, attempt=2, seq=None, pass_index=1, straggler=True),
    span("optim_step", "session 1", 10.0, 10.0, 11.0, seq=2, attempt=2, pass_index=2),
]
PASSES = [train_pass(0, 0.5, 1.5), train_pass(1, 2.5, 3.0, "sample"), train_pass(2, 10.0, 11.0)]
EVENTS = [ServiceEvent(name="restart", started_at=2.0, finished_at=9.0)]


def trace_events(devices: int = 2) -> list[dict]:
    return chrome_trace(SPANS, PASSES, EVENTS, devices=devices, title="t")["traceEvents"]


def on(events: list[dict], pid: int, ph: str) -> list[dict]:
    return [event for event in events if event["pid"] == pid and event["ph"] == ph]


# --- trace ---------------------------------------------------------------------------------


def test_lanes_get_tids_in_order_of_first_span() -> None:
    assert lane_tids(SPANS) == {"session 1": 1, "sampler 2": 2}
    tied = [span("sample", "b", 1.0, 1.0, 2.0), span("sample", "a", 1.0, 1.0, 2.0), span("sample", "c", 0.5, 1, 2)]
    assert lane_tids(tied) == {"c": 1, "b": 2, "a": 3}
    names = {e["tid"]: e["args"]["name"] for e in on(trace_events(), 1, "M") if e["name"] == "thread_name"}
    assert names == {1: "session 1", 2: "sampler 2"}


def test_processes_are_named() -> None:
    names = {e["pid"]: e["args"]["name"] for e in trace_events() if e["name"] == "process_name"}
    assert names == {1: "sessions", 2: "devices", 3: "service"}


def test_microseconds_round_half_even() -> None:
    assert [microseconds(t) for t in (0.0, 2.5e-6, 3.5e-6, 2.0000005, 0.25)] == [0, 2, 4, 2_000_000, 250_000]
    trace = chrome_trace([span("sample", "s", 0.0, 2.5e-6, 0.25)], [], [], devices=1, title="")
    queued, run = on(trace["traceEvents"], 1, "X")
    assert (queued["ts"], queued["dur"], run["ts"], run["dur"]) == (0, 2, 2, 249_998)


def test_queued_slice_only_when_waiting() -> None:
    slices = on(trace_events(), 1, "X")
    queued = [(e["tid"], e["ts"], e["dur"]) for e in slices if e["name"] == "queued"]
    assert queued == [(1, 0, 500_000), (2, 2_200_000, 300_000)]
    runs = [(e["name"], e["cat"], e["ts"], e["dur"]) for e in slices if e["name"] != "queued"]
    assert runs == [
        ("sample", "rate_limit", 200_000, 1),  # refused at once: still 1 µs long
        ("forward_backward", "ok", 500_000, 1_000_000),
        ("optim_step", "restart", 1_500_000, 500_000),
        ("sample", "ok", 2_500_000, 500_000),
        ("optim_step", "ok", 10_000_000, 1_000_000),
    ]
    (run,) = [e for e in slices if e["name"] == "forward_backward"]
    assert run["args"] == {"seq": 1, "attempt": 1, "outcome": "ok", "tokens": 100, "pass": 0, "straggler": False}


def test_failures_get_an_instant_event() -> None:
    instants = [(e["name"], e["tid"], e["ts"], e["s"]) for e in on(trace_events(), 1, "i")]
    assert instants == [("rate_limit", 2, 200_000, "t"), ("restart", 1, 2_000_000, "t")]


@pytest.mark.parametrize("devices", [1, 3])
def test_every_pass_on_every_device_row(devices: int) -> None:
    events = trace_events(devices)
    rows = {e["tid"]: e["args"]["name"] for e in on(events, 2, "M") if e["name"] == "thread_name"}
    assert rows == {d + 1: f"device {d}" for d in range(devices)}
    slices = on(events, 2, "X")
    assert len(slices) == devices * len(PASSES)
    assert {e["tid"] for e in slices if e["args"]["index"] == 1} == set(rows)
    first = slices[0]
    assert (first["name"], first["ts"], first["dur"]) == ("train pass", 500_000, 1_000_000)
    assert first["args"] == {"index": 0, "requests": 1, "tokens": 100}
    assert {e["name"] for e in slices} == {"train pass", "sample pass"}


def test_service_events() -> None:
    (restart,) = on(trace_events(), 3, "X")
    assert (restart["name"], restart["ts"], restart["dur"]) == ("restart", 2_000_000, 7_000_000)


def test_write_trace_is_byte_identical_and_loads(tmp_path: Path) -> None:
    first, second, changed = tmp_path / "a" / "b" / "one.json", tmp_path / "two.json", tmp_path / "three.json"
    write_trace(first, SPANS, PASSES, EVENTS, devices=2, title="run")
    write_trace(second, list(SPANS), list(PASSES), list(EVENTS), devices=2, title="run")
    assert first.read_bytes() == second.read_bytes()
    moved = [dataclasses.replace(SPANS[0], finished_at=0.200001)] + SPANS[1:]
    write_trace(changed, moved, PASSES, EVENTS, devices=2, title="run")
    assert changed.read_bytes() != first.read_bytes()
    loaded = json.loads(first.read_text())
    assert isinstance(loaded, dict) and isinstance(loaded["traceEvents"], list)
    assert loaded["displayTimeUnit"] == "ms" and loaded["otherData"] == {"title": "run"}


# --- report --------------------------------------------------------------------------------


def test_report_counts() -> None:
    report = build_report(SPANS, PASSES, EVENTS, hardware="H100", devices=8, model="m")
    assert report.requests == {"forward_backward": 1, "optim_step": 2, "sample": 2}
    assert report.retries == {"optim_step": 1, "sample": 1}
    assert report.faults == {"lost_in_restart": 1, "rate_limit": 1, "restart": 1, "straggler": 1}
    assert list(report.faults) == sorted(report.faults)


def test_report_times_and_cost() -> None:
    report = build_report(SPANS, PASSES, EVENTS, hardware="H100", devices=8, model="m")
    assert report.wall_s == 11.0
    assert report.device_busy_s == 2.5
    assert report.busy_fraction == 2.5 / 11.0
    assert report.device_hours == 11.0 * 8 / 3600


def test_busy_time_is_the_union_of_passes() -> None:
    overlapping = [train_pass(0, 0.0, 2.0), train_pass(1, 1.0, 3.0), train_pass(2, 1.5, 2.5), train_pass(3, 5.0, 6.0)]
    assert busy_seconds(overlapping) == 4.0
    assert busy_seconds(list(reversed(overlapping))) == 4.0
    assert busy_seconds([]) == 0.0


def test_empty_report() -> None:
    report = build_report([], [], [], hardware="H100", devices=2, model="m")
    assert (report.wall_s, report.device_busy_s, report.busy_fraction, report.device_hours) == (0, 0, 0, 0)
    assert report.requests == report.retries == report.faults == {}
    assert report.text.splitlines()[1:4] == ["  requests: none", "  retries: none", "  faults: none"]
    assert report.text.splitlines()[-1] == "this loop: 0 s on 2×H100 (0 device-seconds), 0 % busy"


def test_report_text() -> None:
    report = build_report(SPANS, PASSES, EVENTS, hardware="H100", devices=8, model="Llama-3.1-8B")
    assert str(report) == "\n".join(
        [
            "simulated run of Llama-3.1-8B on 8×H100",
            "  requests: 5 (forward_backward 1, optim_step 2, sample 2)",
            "  retries: 2 (optim_step 1, sample 1)",
            "  faults: 3 (rate_limit 1, restart 1, lost_in_restart 1, straggler 1)",
            "  simulated wall time: 11.0 s; device busy 2.50 s",
            "this loop: 11.0 s on 8×H100 (88 device-seconds), 23 % busy",
        ]
    )


def test_last_line_with_known_numbers() -> None:
    spans, passes = [span("sample", "sampler 1", 0.0, 0.0, 41.2)], [train_pass(0, 0.0, 24.9)]
    report = build_report(spans, passes, [], hardware="H100", devices=8, model="m")
    assert report.text.splitlines()[-2:] == [
        "  simulated wall time: 41.2 s; device busy 24.9 s",
        "this loop: 0.011 h on 8×H100 (0.092 device-hours), 60 % busy",
    ]
    long = build_report([], [train_pass(0, 0.0, 3.2 * 3600)], [], hardware="H200", devices=2, model="m")
    assert long.text.splitlines()[-2:] == [
        "  simulated wall time: 3.20 h; device busy 3.20 h",
        "this loop: 3.2 h on 2×H200 (6.4 device-hours), 100 % busy",
    ]


def test_number_formats() -> None:
    assert [significant(x, 2) for x in (0.011444, 3.2, 0.0996, 150.4, 0.0)] == ["0.011", "3.2", "0.10", "150", "0"]
    assert [duration(s) for s in (0.0000197, 0.01234, 41.23, 119.0, 750.0, 7199.0, 11700.0)] == [
        "19.7 µs",
        "12.3 ms",
        "41.2 s",
        "119 s",
        "12.5 min",
        "120.0 min",
        "3.25 h",
    ]
