"""Conformance suite: Hypothesis properties that check any Bios backend against the emulator
through the public API only.

    python -m conformance --backend jax --profile ci
    conformance.run("mypkg.module:create_backend").failed   # [] when it conforms

Modules: `tolerances` (every tolerance, justified), `strategies` (valid-by-construction and
invalid requests), `harness` (the candidate/reference `Pair` and its comparisons),
`properties` (one module per capability, registered by name), `runner` (reports).
"""

from conformance.runner import PropertyResult, Report, run

__all__ = ["PropertyResult", "Report", "run"]
