"""The simulator's records drawn as a Chrome trace-event JSON file (opens in Perfetto and chrome://tracing).

Three processes: 1 "sessions" (one row per lane: each request attempt's queueing and its run),
2 "devices" (one row per device: the passes they run together) and 3 "service" (restarts and
other service-wide events). Times are integer microseconds of simulated time, so equal records
give byte-identical files.

Imports the standard library and `emulator.simulator.records` only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from emulator.simulator.records import PassSpan, RequestSpan, ServiceEvent

SESSIONS_PID, DEVICES_PID, SERVICE_PID = 1, 2, 3
SERVICE_TID = 1
PROCESSES = ((SESSIONS_PID, "sessions"), (DEVICES_PID, "devices"), (SERVICE_PID, "service"))
TraceEvent = dict[str, object]


def microseconds(seconds: float) -> int:
    """`seconds` as whole microseconds, rounded half to even (Python's `round`)."""
    return round(seconds * 1_000_000)


def lane_tids(spans: Sequence[RequestSpan]) -> dict[str, int]:
    """Thread id of each lane, 1, 2, ... in order of the lane's first span (by `enqueued_at`,
    ties kept in input order). Pure."""
    order = sorted(range(len(spans)), key=lambda i: (spans[i].enqueued_at, i))
    tids: dict[str, int] = {}
    for i in order:
        tids.setdefault(spans[i].lane, len(tids) + 1)
    return tids


def _metadata(pid: int, tid: int | None, kind: str, name: str) -> TraceEvent:
    """A metadata ("M") event naming process `pid` (`tid` None) or its thread `tid`."""
    event: TraceEvent = {"ph": "M", "pid": pid, "name": f"{kind}_name", "args": {"name": name}}
    if tid is not None:
        event["tid"] = tid
    return event


def _sort_index(pid: int, tid: int) -> TraceEvent:
    """Keeps thread `tid` of `pid` in numeric order in the viewer."""
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}}


def _slice(
    pid: int, tid: int, name: str, cat: str, start: float, end: float, args: dict[str, object], min_us: int = 0
) -> TraceEvent:
    """A complete ("X") event from `start` to `end` seconds, lasting at least `min_us` µs."""
    ts = microseconds(start)
    dur = max(min_us, microseconds(end) - ts)
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "cat": cat, "ts": ts, "dur": dur, "args": args}


def request_events(span: RequestSpan, tid: int) -> list[TraceEvent]:
    """One attempt's events on its lane row: "queued" (only if it waited), the run named after
    its kind (at least 1 µs, so an instant refusal stays visible), and for a failure an instant
    event named after the outcome at `finished_at`."""
    args: dict[str, object] = {
        "seq": span.seq,
        "attempt": span.attempt,
        "outcome": span.outcome,
        "tokens": span.tokens,
        "pass": span.pass_index,
        "straggler": span.straggler,
    }
    events: list[TraceEvent] = []
    if span.started_at > span.enqueued_at:
        queued_args: dict[str, object] = {"seq": span.seq, "attempt": span.attempt}
        events.append(_slice(SESSIONS_PID, tid, "queued", "queued", span.enqueued_at, span.started_at, queued_args))
    events.append(_slice(SESSIONS_PID, tid, span.kind, span.outcome, span.started_at, span.finished_at, args, min_us=1))
    if span.outcome != "ok":
        events.append(
            {
                "ph": "i",
                "s": "t",
                "pid": SESSIONS_PID,
                "tid": tid,
                "name": span.outcome,
                "cat": span.outcome,
                "ts": microseconds(span.finished_at),
                "args": {"seq": span.seq, "attempt": span.attempt},
            }
        )
    return events


def pass_events(span: PassSpan, devices: int) -> list[TraceEvent]:
    """The pass as one "X" event on every device row (device d is thread d + 1): the devices
    run each pass together."""
    args: dict[str, object] = {"index": span.index, "requests": span.requests, "tokens": span.tokens}
    name = f"{span.group} pass"
    return [
        _slice(DEVICES_PID, device + 1, name, span.group, span.started_at, span.finished_at, args)
        for device in range(devices)
    ]


def metadata_events(tids: dict[str, int], devices: int) -> list[TraceEvent]:
    """The names (and row order) of the three processes and of their threads: lane `name` is
    thread `tids[name]` of "sessions", device d is thread d + 1 of "devices"."""
    rows = [(SESSIONS_PID, tid, lane) for lane, tid in tids.items()]
    rows += [(DEVICES_PID, device + 1, f"device {device}") for device in range(devices)]
    rows.append((SERVICE_PID, SERVICE_TID, "service"))
    out = [_metadata(pid, None, "process", name) for pid, name in PROCESSES]
    for pid, tid, name in rows:
        out += [_metadata(pid, tid, "thread", name), _sort_index(pid, tid)]
    return out


def chrome_trace(
    spans: Sequence[RequestSpan],
    passes: Sequence[PassSpan],
    events: Sequence[ServiceEvent],
    *,
    devices: int,
    title: str,
) -> dict[str, object]:
    """The records as a trace-event JSON object: {"traceEvents": [...], "displayTimeUnit": "ms",
    "otherData": {"title": title}}. Metadata events come first, then attempts, passes and
    service events in input order. Pure; equal inputs give equal objects."""
    tids = lane_tids(spans)
    out = metadata_events(tids, devices)
    for span in spans:
        out += request_events(span, tids[span.lane])
    for device_pass in passes:
        out += pass_events(device_pass, devices)
    for event in events:
        out.append(_slice(SERVICE_PID, SERVICE_TID, event.name, "service", event.started_at, event.finished_at, {}))
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": {"title": title}}


def write_trace(
    path: str | os.PathLike,
    spans: Sequence[RequestSpan],
    passes: Sequence[PassSpan],
    events: Sequence[ServiceEvent],
    *,
    devices: int,
    title: str,
) -> None:
    """Write `chrome_trace(...)` to `path` as compact JSON with sorted keys, creating parent
    directories; the same records give a byte-identical file."""
    trace = chrome_trace(spans, passes, events, devices=devices, title=title)
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(trace, sort_keys=True, separators=(",", ":")))
