"""The recipes in examples/ learn: reduced runs on the built-in random-weight model (emulator),
each checked for its improvement in the metrics it writes (metrics.jsonl, summary.json)."""

from __future__ import annotations

from pathlib import Path

import pytest
from recipes import run_recipe

pytestmark = pytest.mark.slow  # four recipes end to end

BASE = ["--model", "bios/tiny", "--backend", "emulator", "--seed", "0"]


def _run(name: str, out: Path, *argv: str) -> tuple[list[dict], dict]:
    return run_recipe(name, out, *BASE, *argv)


@pytest.fixture(autouse=True)
def _no_remote(monkeypatch):
    monkeypatch.delenv("BIOS_BASE_URL", raising=False)


def test_sft_loss_falls_and_taught_facts_are_recalled(tmp_path):
    rows, summary = _run("sft", tmp_path, "--steps", "15")
    before, after = summary["before"], summary["after"]
    assert after["test_loss"] < before["test_loss"] - 2.0
    assert after["accuracy"] > before["accuracy"]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0]
    assert "trained questions" in summary["note"]  # honest: random weights are tested on what they learned


def test_rl_mean_reward_rises(tmp_path):
    rows, summary = _run("rl", tmp_path, "--steps", "10")
    rewards = [r["mean_reward"] for r in rows if "mean_reward" in r]
    assert len(rewards) == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3
    assert summary["after"]["sampled_reward"] > summary["before"]["sampled_reward"]


def test_dpo_preference_accuracy_and_margin_rise(tmp_path):
    rows, summary = _run("dpo", tmp_path, "--steps", "8")
    before, after = summary["before"], summary["after"]
    assert after["reward_margin"] > before["reward_margin"] + 0.5
    assert before["preference_accuracy"] == 0.5  # policy = reference: every pair a tie
    assert after["preference_accuracy"] == 1.0
    assert after["prefers_chosen"] > before["prefers_chosen"]
    margins = [r["train_reward_margin"] for r in rows if "train_reward_margin" in r]
    assert margins[-1] > margins[0]


def test_distilled_student_follows_the_instruction_more_often(tmp_path):
    rows, summary = _run("distill", tmp_path, "--steps", "16")
    assert summary["after"]["student_follows"] > summary["before"]["student_follows"]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0]
