"""The stateful conformance machine: the emulator against itself, and the JAX backend against
the emulator, through random sequences of public-API calls (conformance.stateful)."""

from __future__ import annotations

import pytest

from conformance.stateful import machine_for, run_machine


def test_emulator_agrees_with_its_shadow():
    run_machine("emulator", profile="ci")


@pytest.mark.slow
def test_jax_agrees_with_the_emulator():
    run_machine("jax", profile="ci")


def test_machine_for_configures_the_backend_and_profile():
    machine = machine_for("emulator")
    assert machine.backend == "emulator"
    assert machine.TestCase.settings.max_examples == 5
    assert machine.TestCase.settings.stateful_step_count == 8
