"""Shared fixtures: an isolated BIOS_HOME per test session, clients on the emulator, small data."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

import bios
from helpers import MODEL, make_datum, random_batch  # noqa: F401 - re-exported for tests

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

@pytest.fixture(scope="session", autouse=True)
def bios_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    home = str(tmp_path_factory.mktemp("bios-home"))
    os.environ["BIOS_HOME"] = home
    os.environ.pop("BIOS_BASE_URL", None)
    os.environ.pop("BIOS_BACKEND", None)
    return home


@pytest.fixture(scope="session")
def service(bios_home: str) -> bios.ServiceClient:
    return bios.ServiceClient(backend="emulator")


@pytest.fixture
def training(service: bios.ServiceClient) -> bios.TrainingClient:
    """A fresh rank-8 session on the tiny model."""
    return service.create_lora_training_client(base_model=MODEL, rank=8, seed=0)
