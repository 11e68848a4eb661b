"""Shared fixtures: an isolated BIOS_HOME per test session, clients on the emulator, small data.

With `--remote`, a `bios serve --backend emulator --no-auth` is started on loopback for the
session and every ServiceClient talks to it over HTTP (BIOS_BASE_URL); run the API tests so
(`pytest --remote -m api`) to hold the remote transport to the same tests as in-process.
"""

from __future__ import annotations

import os

import pytest
from helpers import MODEL, make_datum, random_batch  # noqa: F401 - re-exported for tests
from hypothesis import settings

import bios

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--remote", action="store_true", help="run the clients against a live `bios serve` on loopback")


@pytest.fixture(scope="session", autouse=True)
def bios_home(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    home = str(tmp_path_factory.mktemp("bios-home"))
    os.environ["BIOS_HOME"] = home
    os.environ.pop("BIOS_BASE_URL", None)
    os.environ.pop("BIOS_BACKEND", None)
    if not request.config.getoption("--remote"):
        yield home
        return
    from server_process import ServerProcess

    with ServerProcess(home, "--backend", "emulator", "--no-auth") as server:
        os.environ["BIOS_BASE_URL"] = server.url
        yield home
        os.environ.pop("BIOS_BASE_URL", None)


@pytest.fixture(scope="session")
def service(bios_home: str) -> bios.ServiceClient:
    return bios.ServiceClient(backend="emulator")


@pytest.fixture
def training(service: bios.ServiceClient) -> bios.TrainingClient:
    """A fresh rank-8 session on the tiny model."""
    return service.create_lora_training_client(base_model=MODEL, rank=8, seed=0)
