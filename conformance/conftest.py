"""pytest entry: `pytest --pyargs conformance --backend jax` runs every registered property
against that backend (default: the emulator against itself), one test per property."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--backend NAME` (default emulator) and `--conformance-profile ci|thorough`."""
    group = parser.getgroup("conformance")
    group.addoption("--backend", default="emulator", help="backend to check: entry-point name or module:factory")
    group.addoption(
        "--conformance-profile", default="ci", choices=["ci", "thorough"], help="Hypothesis profile of the properties"
    )


@pytest.fixture(scope="session")
def conformance_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The candidate/reference Pair, sharing a fresh BIOS_HOME unless one is set."""
    import os

    from conformance.harness import Pair

    if not os.environ.get("BIOS_HOME"):
        os.environ["BIOS_HOME"] = str(tmp_path_factory.mktemp("bios-home"))
    return Pair(request.config.getoption("--backend"))
