"""`bios simulate SCRIPT --profile P` runs an unmodified loop under the simulator and reports;
`bios serve --simulation P` serves one, whose answers equal an unsimulated run's exactly.

The loops run in child processes (`python -m bios ...`), as a user would run them; the example
profiles under examples/profiles/ are the ones exercised.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MODEL, make_datum
from server_process import ThreadedServer

import bios
from bios import types
from bios.server import ServerOptions

PROFILES = Path(__file__).resolve().parents[2] / "examples" / "profiles"
FAULTS = PROFILES / "faults.toml"

LOOP = """\
import argparse

import bios
from bios import types

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--exit-after", type=int, default=None, help="raise SystemExit(3) after this many steps")
args = parser.parse_args()

tokens = list(range(7, 20))
datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]})
training = bios.ServiceClient().create_lora_training_client("bios/tiny", rank=4, seed=0)
for step in range(args.steps):
    loss = training.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    print(f"loss {loss!r}")
    if args.exit_after is not None and step + 1 >= args.exit_after:
        raise SystemExit(3)
"""


@pytest.fixture
def loop(tmp_path: Path) -> Path:
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    return script


def simulate(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """`python -m bios simulate ARGS` in `tmp_path`, with BIOS_HOME there and no BIOS_* settings inherited."""
    env = {"PATH": os.environ.get("PATH", ""), "BIOS_HOME": str(tmp_path), "OPENBLAS_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bios", "simulate", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=False, timeout=300)


def losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^loss (\S+)$", stdout, flags=re.MULTILINE)]


def test_simulate_runs_the_script_with_its_arguments_and_prints_the_report(tmp_path, loop):
    trace = tmp_path / "trace.json"
    done = simulate(tmp_path, "--profile", FAULTS, "--trace", trace, loop, "--steps", "5")
    assert done.returncode == 0, done.stderr
    assert len(losses(done.stdout)) == 5
    assert "requests:" in done.stdout and "this loop:" in done.stdout
    assert "traceEvents" in json.loads(trace.read_text())
    assert str(trace) in done.stdout


def test_the_same_profile_gives_a_byte_identical_trace_and_another_seed_another(tmp_path, loop):
    trace, reseeded = tmp_path / "trace.json", tmp_path / "seed8.toml"
    reseeded.write_text(FAULTS.read_text().replace("seed = 7", "seed = 8"))
    runs = []
    for profile in (FAULTS, FAULTS, reseeded):
        done = simulate(tmp_path, "--profile", profile, "--trace", trace, loop, "--steps", "5")
        assert done.returncode == 0, done.stderr
        runs.append(trace.read_bytes())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize(("line", "field"), [("devices = 0", "devices"), ("devises = 8", "devises")])
def test_a_bad_profile_runs_nothing_and_names_the_field(tmp_path, loop, line, field):
    profile = tmp_path / "bad.toml"
    profile.write_text(f'hardware = "H100"\n{line}\n')
    done = simulate(tmp_path, "--profile", profile, loop, "--steps", "5")
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"SimulationConfig.{field}" in done.stderr and str(profile) in done.stderr


def test_a_missing_script_is_refused(tmp_path):
    done = simulate(tmp_path, "--profile", FAULTS, tmp_path / "absent.py")
    assert done.returncode == 2 and "absent.py is not a file" in done.stderr


def test_a_failing_script_keeps_its_exit_code_and_the_report_is_printed(tmp_path, loop):
    done = simulate(tmp_path, "--profile", FAULTS, loop, "--steps", "5", "--exit-after", "1")
    assert done.returncode == 3, done.stderr
    assert len(losses(done.stdout)) == 1
    assert "this loop:" in done.stdout


PROBE = """\
import os

import bios

client = bios.ServiceClient()
print("environment", os.environ.get("BIOS_SIMULATION"), os.environ.get("BIOS_BACKEND"))
print("client", client.config.simulation is not None, client.config.backend)
"""


def test_the_script_is_configured_without_writing_its_environment(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    done = simulate(tmp_path, "--profile", FAULTS, script)
    assert done.returncode == 0, done.stderr
    assert "environment None None" in done.stdout  # nothing leaks to the script's subprocesses
    assert "client True emulator" in done.stdout


def test_a_script_without_a_client_is_told_so(tmp_path):
    script = tmp_path / "idle.py"
    script.write_text("print('idle')\n")
    done = simulate(tmp_path, "--profile", FAULTS, script)
    assert done.returncode == 1
    assert done.stdout == "idle\n" and "created no ServiceClient" in done.stderr


def test_bios_simulation_trace_overrides_the_profiles_trace(tmp_path, monkeypatch):
    profile = tmp_path / "traced.toml"
    profile.write_text('trace = "in-profile.json"\n')
    monkeypatch.setenv("BIOS_SIMULATION", str(profile))
    monkeypatch.delenv("BIOS_SIMULATION_TRACE", raising=False)
    assert bios.SimulationConfig.from_env().trace == str(tmp_path / "in-profile.json")
    monkeypatch.setenv("BIOS_SIMULATION_TRACE", str(tmp_path / "elsewhere.json"))
    assert bios.SimulationConfig.from_env().trace == str(tmp_path / "elsewhere.json")


def test_serve_refuses_a_bad_simulation_profile_at_startup(tmp_path):
    profile = tmp_path / "bad.toml"
    profile.write_text("devices = 0\n")
    env = {"PATH": os.environ.get("PATH", ""), "BIOS_HOME": str(tmp_path), "OPENBLAS_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "bios",
        "serve",
        "--backend",
        "emulator",
        "--no-auth",
        "--port",
        "0",
        "--simulation",
        str(profile),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=120)
    assert done.returncode == 2
    assert "SimulationConfig.devices" in done.stderr


def sft_losses(service: bios.ServiceClient, steps: int = 5) -> list[float]:
    """Losses of `steps` forward_backward + optim_step on one fixed datum, from a seeded adapter."""
    datum = make_datum(list(range(7, 20)))
    training = service.create_lora_training_client(MODEL, rank=4, seed=0)
    out = []
    for _ in range(steps):
        out.append(training.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"])
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return out


@pytest.mark.inprocess
def test_a_simulated_server_answers_exactly_what_an_unsimulated_run_computes(tmp_path, monkeypatch):
    monkeypatch.delenv("BIOS_SIMULATION", raising=False)
    expected = sft_losses(bios.ServiceClient(backend="emulator"))
    options = ServerOptions(backend="emulator", no_auth=True, home=tmp_path, simulation=FAULTS)
    with ThreadedServer(options) as server:
        assert server.service.simulator is not None
        client = bios.ServiceClient(base_url=server.url)
        assert client.get_server_capabilities().simulated_time_scale == 0.0
        assert client.transport.clock.jumps  # the client's retries back off on simulated time: no real waits
        got = sft_losses(client)
        report = server.service.simulation_report()
    assert got == expected
    assert report.requests["forward_backward"] >= 5 and report.requests["optim_step"] >= 5
    assert sum(report.retries.values()) >= 1 and report.faults
