"""Running the registered properties against one backend and reporting per property.

`run(backend, profile, only)` builds a `harness.Pair`, runs every property whose name contains
`only` as a Hypothesis test under the chosen profile, catches each failure, and returns a
`Report`. `format_table(report)` renders it as a plain-text table.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from hypothesis import HealthCheck, Phase, given, settings

from conformance.harness import Pair, enable_default_home
from conformance.properties import REGISTRY, Property

_SUPPRESSED = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.function_scoped_fixture,
]
settings.register_profile(
    "conformance-ci",
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_SUPPRESSED,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure is reported as first found, in bounded time
)
settings.register_profile(
    "conformance-thorough", max_examples=200, deadline=None, database=None, suppress_health_check=_SUPPRESSED
)
PROFILES = {"ci": "conformance-ci", "thorough": "conformance-thorough"}
"""Profile names of the command line → the Hypothesis profiles registered above (prefixed so that
a test suite's own `ci` profile is never overwritten)."""


@dataclass
class PropertyResult:
    """One property's outcome: examples run, worst deviation (text), error (one line) if failed."""

    name: str
    passed: bool
    examples: int
    worst: str
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Report:
    """The outcome of one run: the backend checked, the profile, one result per property."""

    backend: str
    profile: str
    results: list[PropertyResult] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """Names of the properties that failed."""
        return [r.name for r in self.results if not r.passed]

    def to_json(self) -> str:
        """The report as JSON: backend, profile, failed names, every result."""
        return json.dumps(
            {
                "backend": self.backend,
                "profile": self.profile,
                "failed": self.failed,
                "results": [asdict(r) for r in self.results],
            },
            indent=1,
        )


def _one_line(text: str, limit: int = 600) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_property(prop: Property, pair: Pair, profile: str = "ci") -> PropertyResult:
    """Run `prop` as a Hypothesis test on `pair` under `profile`; never raises for a failure."""
    counter = [0]

    def body(pair: Pair, **drawn: object) -> None:
        counter[0] += 1
        prop.body(pair, **drawn)

    body.__name__ = prop.name
    strategies = {name: factory(pair.spec) for name, factory in prop.strategies.items()}
    test = settings(settings.get_profile(PROFILES.get(profile, profile)))(given(**strategies)(body))
    pair.recorder.current = prop.name
    start = time.perf_counter()
    error = None
    try:
        test(pair)
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the table
        notes = " ".join(n for n in getattr(exc, "__notes__", []) if "Falsifying" in n or "=" in n)
        where = traceback.extract_tb(exc.__traceback__)[-1]
        error = _one_line(f"{type(exc).__name__}: {exc} [{where.name}:{where.lineno}] {notes}")
    worst = pair.recorder.worst.get(prop.name)
    return PropertyResult(
        prop.name, error is None, counter[0], str(worst) if worst else "-", error, time.perf_counter() - start
    )


def run(
    backend: str,
    profile: str = "ci",
    only: str | None = None,
    *,
    base_url: str | None = None,
    on_result: Callable[[PropertyResult], None] | None = None,
) -> Report:
    """Check `backend` (entry-point name or `module:factory`; or a server at `base_url`) against
    the emulator with every registered property whose name contains `only`; `on_result` is
    called with each property's result as soon as it is known."""
    enable_default_home()
    pair = Pair(backend, base_url=base_url)
    report = Report(pair.backend, profile)
    for prop in REGISTRY.values():
        if only is None or only in prop.name:
            report.results.append(run_property(prop, pair, profile))
            if on_result is not None:
                on_result(report.results[-1])
    return report


def format_table(report: Report) -> str:
    """The report as a fixed-width table, failures' errors below it."""
    rows = [("property", "result", "examples", "seconds", "worst deviation")]
    rows += [
        (r.name, "pass" if r.passed else "FAIL", str(r.examples), f"{r.seconds:.1f}", r.worst) for r in report.results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"conformance of backend {report.backend!r} (profile {report.profile})"]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    for r in report.results:
        if not r.passed:
            lines.append(f"\n{r.name} FAILED: {r.error}")
    failed = report.failed
    lines.append(f"\n{len(report.results) - len(failed)} passed, {len(failed)} failed")
    return "\n".join(lines)
