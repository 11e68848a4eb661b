"""The recipes run unchanged against `bios serve` (`--base-url`): on the emulator, a recipe
driven over HTTP writes exactly the metrics it writes in this process."""

from __future__ import annotations

import pytest
from recipes import run_recipe
from server_process import ThreadedServer

from bios.server import ServerOptions

pytestmark = pytest.mark.slow  # every recipe twice, in-process and over HTTP

BASE = ["--model", "bios/tiny", "--seed", "0"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ThreadedServer(
        ServerOptions(backend="emulator", no_auth=True, home=tmp_path_factory.mktemp("recipes-home"))
    ) as running:
        yield running


@pytest.fixture(autouse=True)
def _no_ambient_server(monkeypatch):
    monkeypatch.delenv("BIOS_BASE_URL", raising=False)


@pytest.mark.inprocess
@pytest.mark.parametrize("name, steps", [("sft", 4), ("rl", 3), ("dpo", 3), ("distill", 4)])
def test_a_recipe_over_http_writes_what_it_writes_in_process(server, tmp_path, name, steps):
    local_rows, local_summary = run_recipe(
        name, tmp_path / "local", *BASE, "--backend", "emulator", "--steps", str(steps)
    )
    calls_before = server.service.engine.scheduler.backend_calls
    remote_rows, remote_summary = run_recipe(
        name, tmp_path / "remote", *BASE, "--base-url", server.url, "--steps", str(steps)
    )
    assert len(remote_rows) == len(local_rows) > steps
    assert remote_rows == local_rows
    remote_checkpoint, local_checkpoint = remote_summary.pop("checkpoint", None), local_summary.pop("checkpoint", None)
    assert remote_summary == local_summary
    assert (remote_checkpoint is None) == (local_checkpoint is None)  # sft names its own session's adapter
    assert server.service.engine.scheduler.backend_calls > calls_before + steps  # the server did the work
