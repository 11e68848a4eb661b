"""The main job: `bios demo` visibly learns to reverse sentences and saves a checkpoint."""

from __future__ import annotations

import re

import pytest

from bios.cli import main

pytestmark = pytest.mark.slow  # the whole demo, about a minute


def test_demo_learns_the_task(capsys):
    assert main(["demo", "--steps", "150"]) == 0
    out = capsys.readouterr().out
    before = int(re.search(r"before training: (\d+)/24", out).group(1))
    after = int(re.search(r"after training: (\d+)/24", out).group(1))
    losses = [float(x) for x in re.findall(r"loss\s+([\d.]+)", out)]
    assert before == 0 and after >= 12, out
    assert losses[-1] < 0.5 * losses[0]
    assert re.search(r"checkpoint saved: bios://session-[0-9a-f]+/weights/demo-final", out)


def test_models_and_checkpoints_commands(capsys, training):
    assert main(["models"]) == 0
    assert "ultrasafe/usf-healthcare" in capsys.readouterr().out
    path = training.save_state("cli-listed").result().path
    assert main(["checkpoints", "list", "--session", training.session_id]) == 0
    assert path in capsys.readouterr().out
    assert main(["checkpoints", "delete", path]) == 0
    assert main(["checkpoints", "delete", path]) == 2
    assert "no checkpoint" in capsys.readouterr().err
