"""Packaging: the wheel installs into a fresh virtualenv outside the checkout and works there."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and installs it into a fresh venv

ROOT = Path(__file__).resolve().parents[1]

DEMO = textwrap.dedent(
    """
    import sys
    import bios, backends
    from importlib.metadata import entry_points
    from bios import types
    assert "jax" not in sys.modules, "import bios / import backends must not import jax"
    assert bios.__file__.startswith(sys.prefix), bios.__file__
    assert "emulator" in [ep.name for ep in entry_points(group="bios.backends")]
    training = bios.ServiceClient().create_lora_training_client(base_model="bios/tiny", rank=4)
    tokenizer = training.get_tokenizer()
    tokens = tokenizer.encode("the cat sat on the mat")
    model_input = types.ModelInput.from_ints(tokens[:-1])
    datum = types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": tokens[1:]})
    losses = [training.train([datum], learning_rate=1e-2).loss for _ in range(5)]
    assert losses[-1] < losses[0], losses
    greedy = types.SamplingParams(max_tokens=4, temperature=0)
    sample = training.sample(types.ModelInput.from_ints(tokens[:3]), greedy).result()
    print("ok", len(sample.sequences[0].tokens), training.save_state("packaged").result().path)
    """
)


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(ROOT)], check=True
    )
    (wheel,) = wheels.glob("bios-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = subprocess.run(
        [str(python), "-c", DEMO],
        cwd=outside,
        capture_output=True,
        text=True,
        env={"BIOS_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok 4 bios://")
    cli = subprocess.run(
        [str(venv / "bin" / "bios"), "models"],
        cwd=outside,
        capture_output=True,
        text=True,
        env={"BIOS_HOME": str(tmp_path / "home")},
    )
    assert cli.returncode == 0 and "ultrasafe/usf-finance" in cli.stdout
