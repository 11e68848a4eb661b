"""The conformance suite's ci profile holds a live `bios serve` (emulator backend, same
BIOS_HOME) to the emulator in this process: every property passes through the HTTP transport."""

from __future__ import annotations

import os

import pytest
from server_process import ServerProcess

from conformance import run

pytestmark = pytest.mark.slow  # the whole conformance suite through a live server


def test_a_server_passes_the_conformance_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOS_HOME", str(tmp_path))  # the server and the reference share checkpoints
    with ServerProcess(tmp_path, "--backend", "emulator", "--no-auth") as server:
        report = run("server", "ci", base_url=server.url)
    assert len(report.results) >= 14 and report.failed == [], [r.error for r in report.results if not r.passed]
    assert os.listdir(tmp_path / "checkpoints")  # the properties saved and loaded through the server
