"""One pytest test per registered conformance property (see conftest.py for `--backend`)."""

from __future__ import annotations

import pytest

from conformance.properties import REGISTRY
from conformance.runner import run_property


@pytest.mark.parametrize("name", list(REGISTRY))
def test_property(name: str, conformance_pair, request: pytest.FixtureRequest) -> None:
    """The property `name` holds for the backend under test."""
    result = run_property(REGISTRY[name], conformance_pair, request.config.getoption("--conformance-profile"))
    assert result.passed, f"{name} ({result.examples} examples, worst {result.worst}): {result.error}"
