"""`bios keys create`, `bios serve` as a process, and `bios sessions list`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import MODEL, random_batch
from server_process import ServerProcess

import bios


def _bios(*args: str, home) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bios", *args],
        capture_output=True,
        text=True,
        env={"BIOS_HOME": str(home), "PATH": ""},
        check=False,
    )


def test_a_created_key_opens_the_server_and_its_sessions_are_listed(tmp_path):
    made = _bios("keys", "create", "alice", home=tmp_path)
    key = made.stdout.strip()
    assert made.returncode == 0 and key.startswith("tml-") and key not in (tmp_path / "server" / "keys").read_text()
    with ServerProcess(tmp_path, "--backend", "emulator") as server:
        with pytest.raises(bios.AuthenticationError):
            bios.ServiceClient(base_url=server.url, api_key="tml-wrong").get_server_capabilities()
        training = bios.ServiceClient(base_url=server.url, api_key=key).create_lora_training_client(MODEL, rank=4)
        assert training.train(random_batch(seed=1), learning_rate=1e-2).step == 1
    listed = _bios("sessions", "list", home=tmp_path)
    assert training.session_id in listed.stdout and MODEL in listed.stdout


def test_keys_create_marks_an_operator_key_and_refuses_a_spaced_name(tmp_path):
    from bios.server.auth import KeyRing, owner_of

    operator = _bios("keys", "create", "ops", "--operator", home=tmp_path)
    assert operator.returncode == 0 and "operator key" in operator.stderr
    keys_file = tmp_path / "server" / "keys"
    assert keys_file.read_text().split()[1:] == ["ops", "operator"]
    assert KeyRing(keys_file).is_operator(owner_of(operator.stdout.strip()))
    refused = _bios("keys", "create", "two words", home=tmp_path)
    assert refused.returncode == 2 and "name" in refused.stderr and len(keys_file.read_text().splitlines()) == 1


def test_serve_refuses_no_auth_off_loopback_and_a_server_without_keys(tmp_path):
    off_loopback = _bios("serve", "--no-auth", "--host", "0.0.0.0", "--backend", "emulator", home=tmp_path)
    assert off_loopback.returncode == 2 and "loopback" in off_loopback.stderr
    keyless = _bios("serve", "--backend", "emulator", home=tmp_path)
    assert keyless.returncode == 2 and "bios keys create" in keyless.stderr


def test_checkpoints_export_copies_a_sampler_checkpoints_peft_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOS_HOME", str(tmp_path))  # the in-process service below writes here
    training = bios.ServiceClient(backend="emulator").create_lora_training_client(MODEL, rank=4, seed=3)
    training.train(random_batch(seed=3), learning_rate=1e-2)
    path = training.save_weights_for_sampler("export-me").result().path
    exported = _bios("checkpoints", "export", path, str(tmp_path / "out"), home=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}
    state = _bios(
        "checkpoints", "export", path.replace("sampler_weights", "weights"), str(tmp_path / "x"), home=tmp_path
    )
    assert state.returncode == 2 and "no checkpoint" in state.stderr
