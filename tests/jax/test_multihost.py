"""`bios serve` over several local processes (jax.distributed, gloo CPU collectives): process 0
serves HTTP and every process runs each backend call, so a run over 2 processes (of one or of
two devices each) gives what one process gives; checkpoints move between meshes of 1, 2 and 4
devices; a refused request keeps the processes in lockstep; closing the server ends every
process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import MODEL, random_batch, saved_weights
from server_process import ServerProcess, free_port

import bios
from bios import types
from bios.errors import InvalidRequestError

pytestmark = pytest.mark.slow

ADAM = types.AdamParams(learning_rate=1e-2)
GREEDY = types.SamplingParams(max_tokens=6, temperature=0.0)
PROMPT = types.ModelInput.from_ints([5, 17, 99, 4000])


class Group:
    """`bios serve --backend jax` as `processes` local processes of `devices` CPU devices each;
    process 0 is the `ServerProcess`, the others its followers. A context manager."""

    def __init__(self, home: Path, processes: int, devices: int) -> None:
        coordinator = f"127.0.0.1:{free_port()}"
        self.env = {
            "JAX_NUM_CPU_DEVICES": str(devices),
            "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", str(home / "jax-cache")),
            "JAX_PLATFORMS": "cpu",
        }
        self.args = lambda i: (
            "--backend", "jax", "--no-auth", "--coordinator", coordinator,
            "--num-processes", str(processes), "--process-id", str(i),
        )  # fmt: skip
        self.leader = ServerProcess(home, *self.args(0), env=self.env)
        self.home, self.processes = home, processes
        self.followers: list[subprocess.Popen] = []

    def __enter__(self) -> Group:
        for i in range(1, self.processes):
            log = open(self.home / f"follower-{self.processes}-{i}.log", "wb")
            self.followers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bios", "serve", "--port", str(free_port()), *self.args(i)],
                    env={**self.leader.env, **self.env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        self.leader.start(timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.leader.stop()
        for follower in self.followers:
            try:
                follower.wait(timeout=60)
            except subprocess.TimeoutExpired:
                follower.kill()
                raise

    def exit_codes(self) -> list[int | None]:
        return [p.poll() for p in [self.leader.process, *self.followers]]


def _train(client: bios.TrainingClient, steps: range) -> list[float]:
    """Losses of forward_backward + optim_step on batches seeded by `steps`."""
    losses = []
    for step in steps:
        losses.append(client.forward_backward(random_batch(seed=step)).result().loss)
        client.optim_step(ADAM).result()
    return losses


def _observe(client: bios.TrainingClient, name: str) -> dict[str, object]:
    """Forward logprobs, a greedy sample and the weights saved as checkpoint `name`, now."""
    forward = client.forward(random_batch(seed=99)).result()
    logprobs = np.concatenate([out["logprobs"].to_numpy() for out in forward.loss_fn_outputs])
    sample = client.sample(PROMPT, GREEDY).result().sequences[0].tokens
    path = client.save_state(name).result().path
    return {"loss": forward.loss, "logprobs": logprobs, "sample": sample, "path": path, "weights": saved_weights(path)}


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-6, atol=1e-6)
    assert a["sample"] == b["sample"]
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        np.testing.assert_allclose(a["weights"][name], b["weights"][name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_two_processes_serve_what_one_serves_and_share_checkpoints(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BIOS_HOME", str(home))

    single = bios.ServiceClient(backend="jax")
    reference = single.create_lora_training_client(MODEL, rank=4, seed=3)
    reference_losses = _train(reference, range(2))
    expected = _observe(reference, "one-2")
    continued_losses = _train(reference, range(2, 4))
    continued = _observe(reference, "one-4")

    with Group(home, processes=2, devices=1) as pair:
        service = bios.ServiceClient(base_url=pair.leader.url)
        client = service.create_lora_training_client(MODEL, rank=4, seed=3)
        np.testing.assert_allclose(_train(client, range(2)), reference_losses, rtol=1e-6)
        with pytest.raises(InvalidRequestError) as refused:  # above bios/tiny's maximum rank, 32
            service.create_lora_training_client(MODEL, rank=64, seed=1)
        assert refused.value.field == "rank"
        written = _observe(client, "pair-2")  # still in lockstep after the refusal
        _same(written, expected)
    assert pair.exit_codes() == [143, 0]  # SIGTERM to process 0 (128 + 15) ends the follower too

    with Group(home, processes=2, devices=2) as two:
        resumed = bios.ServiceClient(base_url=two.leader.url).create_training_client_from_state_with_optimizer(
            written["path"]
        )
        np.testing.assert_allclose(_train(resumed, range(2, 4)), continued_losses, rtol=1e-6)
        _same(_observe(resumed, "two-4"), continued)
        # a single process's checkpoint (Orbax, the jax backend's own format) loads on process 0 alone
        from_one = bios.ServiceClient(base_url=two.leader.url).create_training_client_from_state_with_optimizer(
            expected["path"]
        )
        np.testing.assert_allclose(_train(from_one, range(2, 4)), continued_losses, rtol=1e-6)
    assert two.exit_codes() == [143, 0]

    alone = single.create_training_client_from_state_with_optimizer(written["path"])
    np.testing.assert_allclose(_train(alone, range(2, 4)), continued_losses, rtol=1e-6)
    _same(_observe(alone, "alone-4"), continued)
