"""`python -m conformance --backend NAME | --base-url URL [--profile ci|thorough] [--report F] [--only S]`.

Exit status 0 when every property passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conformance.runner import PROFILES, PropertyResult, format_table, run


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the properties, print the table; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m conformance", description="Check a Bios backend against the emulator."
    )
    parser.add_argument("--backend", default=None, help="entry-point name (jax) or module:factory")
    parser.add_argument(
        "--base-url", default=None, help="check a running `bios serve` instead (its key from BIOS_API_KEY)"
    )
    parser.add_argument("--profile", default="ci", choices=sorted(PROFILES))
    parser.add_argument("--report", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--only", default=None, help="run only properties whose name contains this")
    args = parser.parse_args(argv)
    if (args.backend is None) == (args.base_url is None):
        parser.error("give --backend NAME or --base-url URL")

    def progress(result: PropertyResult) -> None:
        print(
            f"{'pass' if result.passed else 'FAIL'}  {result.name}  "
            f"({result.examples} examples, {result.seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    report = run(args.backend or "server", args.profile, args.only, base_url=args.base_url, on_result=progress)
    print(format_table(report))
    if args.report is not None:
        args.report.write_text(report.to_json())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
