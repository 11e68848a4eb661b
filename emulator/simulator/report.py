"""The summary of a simulated run: counts, simulated wall and busy time, the projected cost.

`build_report` turns the simulator's records into a `bios.simulation.SimulationReport` whose
`text` ends in the line "this loop: X h on N×HW (Y device-hours), Z % busy".

Imports the standard library, `bios.simulation` and `emulator.simulator.records` only.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from bios.simulation import SimulationReport
from emulator.simulator.records import PassSpan, RequestSpan, ServiceEvent

LOST = "lost_in_restart"
"""Fault key of a request lost in flight to a restart (a consequence, not an injected fault)."""


def _sorted_counts(counts: Counter[str]) -> dict[str, int]:
    """`counts` without zeros, keys sorted."""
    return {key: counts[key] for key in sorted(counts) if counts[key]}


def count_requests(spans: Sequence[RequestSpan]) -> tuple[dict[str, int], dict[str, int]]:
    """(attempts by kind, attempts after the first by kind), zeros omitted, keys sorted."""
    requests = Counter(span.kind for span in spans)
    retries = Counter(span.kind for span in spans if span.attempt > 1)
    return _sorted_counts(requests), _sorted_counts(retries)


def count_faults(spans: Sequence[RequestSpan], events: Sequence[ServiceEvent]) -> dict[str, int]:
    """Faults by kind: each failed attempt under its outcome (outcome "restart" as
    "lost_in_restart"), "restart" per restart event, "straggler" per slowed attempt.
    Zeros omitted, keys sorted."""
    faults = Counter(LOST if span.outcome == "restart" else span.outcome for span in spans if span.outcome != "ok")
    faults["restart"] = sum(event.name == "restart" for event in events)
    faults["straggler"] = sum(span.straggler for span in spans)
    return _sorted_counts(faults)


def wall_seconds(spans: Sequence[RequestSpan], passes: Sequence[PassSpan], events: Sequence[ServiceEvent]) -> float:
    """Latest end minus earliest start over all records (a span starts when enqueued); 0 when
    there are none."""
    starts = [s.enqueued_at for s in spans] + [p.started_at for p in passes] + [e.started_at for e in events]
    ends = [s.finished_at for s in spans] + [p.finished_at for p in passes] + [e.finished_at for e in events]
    return max(ends) - min(starts) if starts else 0.0


def busy_seconds(passes: Sequence[PassSpan]) -> float:
    """Total length of the union of the pass intervals, in seconds (overlaps counted once)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted((p.started_at, p.finished_at) for p in passes):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def significant(value: float, figures: int) -> str:
    """`value` rounded to `figures` significant figures, in plain decimal notation ("0.011",
    "3.2", "150"); "0" for zero."""
    if value == 0:
        return "0"
    rounded = float(f"{value:.{figures - 1}e}")
    decimals = max(0, figures - 1 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:.{decimals}f}"


def duration(seconds: float) -> str:
    """A duration for reading: "19.7 µs" / "110 ms" under a second, "41.2 s" under 120 s,
    "12.5 min" under 2 h, else "3.25 h"."""
    if 0 < seconds < 1e-3:
        return f"{significant(seconds * 1e6, 3)} µs"
    if 0 < seconds < 1:
        return f"{significant(seconds * 1e3, 3)} ms"
    if seconds < 120:
        return f"{significant(seconds, 3)} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _ordered(faults: dict[str, int]) -> list[str]:
    """Fault keys sorted, with "lost_in_restart" right after "restart" (its cause)."""
    return sorted(faults, key=lambda key: ("restart", 1) if key == LOST else (key, 0))


def count_line(label: str, counts: dict[str, int], keys: Iterable[str] | None = None, total: int | None = None) -> str:
    """ "label: total (key n, ...)", or "label: none" when there is nothing to count."""
    if not counts:
        return f"{label}: none"
    keys = list(counts) if keys is None else keys
    total = sum(counts.values()) if total is None else total
    return f"{label}: {total} ({', '.join(f'{key} {counts[key]}' for key in keys)})"


def summary_text(report: SimulationReport) -> str:
    """The report's lines; the total of faults leaves out "lost_in_restart", which the restart
    already counts. The last line is the projected cost of this loop."""
    fleet = f"{report.devices}×{report.hardware}"
    injected = sum(n for key, n in report.faults.items() if key != LOST)
    lines = [
        f"simulated run of {report.model} on {fleet}",
        "  " + count_line("requests", report.requests),
        "  " + count_line("retries", report.retries),
        "  " + count_line("faults", report.faults, _ordered(report.faults), injected),
        f"  simulated wall time: {duration(report.wall_s)}; device busy {duration(report.device_busy_s)}",
        cost_line(report, fleet),
    ]
    return "\n".join(lines)


def cost_line(report: SimulationReport, fleet: str) -> str:
    """ "this loop: 3.2 h on 8×H100 (26 device-hours), 61 % busy" — in hours (2 significant
    figures) from 0.01 h on; a shorter run is given as a duration and in device-seconds."""
    if report.wall_s >= 36:
        return (
            f"this loop: {significant(report.wall_s / 3600, 2)} h on {fleet} "
            f"({significant(report.device_hours, 2)} device-hours), {round(100 * report.busy_fraction)} % busy"
        )
    device_seconds = significant(report.wall_s * report.devices, 2)
    busy = round(100 * report.busy_fraction)
    return f"this loop: {duration(report.wall_s)} on {fleet} ({device_seconds} device-seconds), {busy} % busy"


def build_report(
    spans: Sequence[RequestSpan],
    passes: Sequence[PassSpan],
    events: Sequence[ServiceEvent],
    *,
    hardware: str,
    devices: int,
    model: str,
) -> SimulationReport:
    """The `SimulationReport` of these records on `devices` × `hardware` for `model`:
    counts by kind, simulated wall and device-busy seconds, busy fraction (0 when the wall
    time is 0), device-hours = wall_s × devices / 3600, and the printed `text`. Pure."""
    requests, retries = count_requests(spans)
    wall = wall_seconds(spans, passes, events)
    busy = busy_seconds(passes)
    report = SimulationReport(
        hardware=hardware,
        devices=devices,
        model=model,
        requests=requests,
        retries=retries,
        faults=count_faults(spans, events),
        wall_s=wall,
        device_busy_s=busy,
        busy_fraction=busy / wall if wall > 0 else 0.0,
        device_hours=wall * devices / 3600,
    )
    return report.model_copy(update={"text": summary_text(report)})
