"""kill -9 of `bios serve` while clients of the official Tinker SDK train, and a restart on the
same home: what the server had accepted runs to the end under the same request ids, so the SDK
sees no error, every step is acknowledged once and in order, and each run's final weights and
Adam moments equal an uninterrupted in-process run's bit for bit."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import MODEL, make_datum
from server_process import ServerProcess
from tinker_sdk import SDK_RELEASES, sdk_result, start_sdk

import bios
from bios import types
from bios.backend import AdapterState
from bios.engine import CheckpointStore
from bios.server.auth import owner_of
from bios.server.db import Records, RequestRow, connect, default_url
from bios.server.tinker.bodies import TinkerLora
from bios.server.tinker.ids import Runs

pytestmark = pytest.mark.slow  # SDK clients in child processes, and up to 20 s of downtime

KEY = "tml-restart-test-key-0000"
ADAM = {"learning_rate": 1e-2, "weight_decay": 0.01}
SEEDS = (1, 2, 3)
STEPS = 6
CHUNK = 2
SERVE_IN_CHUNKS = (
    "-c",
    "import sys; from bios.server.tinker import session_routes as routes; "
    f"routes.CLIENT_CONFIG['fwdbwd_max_chunk_len'] = {CHUNK}; from bios.cli import main; sys.exit(main())",
)
"""`bios serve`, telling the SDK to send forward_backward in chunks of CHUNK data."""
TICKS = "cycle_s = 0.05\ntime_scale = 1.0\n"
"""A simulation profile without faults whose device passes wait for the next 50 ms tick, so that
the clients have requests in flight whenever the server is killed."""


def _batches(seed: int) -> list[list[list[int]]]:
    """Per step, the token sequences run `seed` trains on: five (three forward_backward chunks)
    on even steps, one on odd steps."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(4, 4096, 12).tolist() for _ in range(5 if step % 2 == 0 else 1)] for step in range(STEPS)]


def _uninterrupted(seed: int, batches: list[list[list[int]]]) -> AdapterState:
    """The state an in-process emulator run reaches with the same adapter, chunks and steps."""
    lora = TinkerLora(rank=4, seed=seed).to_bios()
    twin = bios.ServiceClient(backend="emulator").create_lora_training_client(MODEL, lora_config=lora)
    for batch in batches:
        for start in range(0, len(batch), CHUNK):
            twin.forward_backward([make_datum(t) for t in batch[start : start + CHUNK]], "cross_entropy").result()
        twin.optim_step(types.AdamParams(**ADAM)).result()
    path = twin.save_state(f"uninterrupted-{seed}-{time.monotonic_ns()}").result().path
    return CheckpointStore(Path(os.environ["BIOS_HOME"]) / "checkpoints").load(path, "uninterrupted")


def _acknowledged(progress: Path) -> int:
    return len(progress.read_text().split()) if progress.exists() else 0


def _wait_for(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the clients made no progress"
        time.sleep(0.02)


def _pending(home: Path) -> list[RequestRow]:
    """The requests the server had accepted and not answered (read while it is down)."""
    engine = connect(default_url(home))
    try:
        return Records(engine).pending_requests()
    finally:
        engine.dispose()


def _recovered(log: Path) -> dict[str, int]:
    """The figures of the restarted server's `restored Recovered(...)` log line."""
    line = re.findall(r"restored Recovered\((.*)\)", log.read_text())[-1]
    return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", line)}


@pytest.mark.parametrize("down_s", [4.0, 20.0])
def test_sdk_clients_train_through_a_sigkill_and_restart_unaware(tmp_path, down_s):
    home = tmp_path / "home"
    home.mkdir()
    profile = tmp_path / "ticks.toml"
    profile.write_text(TICKS)
    args = ("--backend", "emulator", "--simulation", str(profile))
    server = ServerProcess(home, *args, env={"BIOS_API_KEYS": KEY}, python_args=SERVE_IN_CHUNKS).start()
    batches = {seed: _batches(seed) for seed in SEEDS}
    progress = {seed: tmp_path / f"progress-{seed}" for seed in SEEDS}
    began = time.monotonic()
    try:
        children = {
            seed: start_sdk(
                SDK_RELEASES[0],
                "interrupted_training",
                url=server.url,
                key=KEY,
                seed=seed,
                batches=batches[seed],
                adam=ADAM,
                progress=str(progress[seed]),
            )
            for seed in SEEDS
        }
        _wait_for(lambda: all(_acknowledged(progress[s]) >= 2 or children[s].poll() is not None for s in SEEDS))
        server.kill()
        in_flight = _pending(home)
        acknowledged_at_kill = {seed: _acknowledged(progress[seed]) for seed in SEEDS}
        time.sleep(down_s)
        server.start()
        seen = {seed: sdk_result(child) for seed, child in children.items()}
    finally:
        server.stop()
    recovered = _recovered(server.log)
    print(
        f"down {down_s:g} s: steps acknowledged at the kill {acknowledged_at_kill}; requests in flight "
        f"{len(in_flight)} {sorted(row.kind for row in in_flight)}; recovery {recovered}; errors "
        f"{[seen[s]['error'] for s in SEEDS]}; wall {time.monotonic() - began:.1f} s"
    )
    for seed in SEEDS:
        assert seen[seed]["error"] is None, f"run {seed}: the SDK saw {seen[seed]['error']}"
        assert seen[seed]["steps"] == [float(step) for step in range(1, STEPS + 1)], f"run {seed}"
    assert in_flight, "requests were in flight at the kill"
    assert recovered["interrupted"] == 0 and recovered["completed"] + recovered["resumed"] == len(in_flight)
    engine = connect(default_url(home))
    runs, store = Runs(engine), CheckpointStore(home / "checkpoints")
    for seed in SEEDS:
        got = store.load(runs.bios_path(owner_of(KEY), seen[seed]["path"]), "restarted")
        expected = _uninterrupted(seed, batches[seed])
        assert got.step == expected.step == STEPS
        for group in ("weights", "adam_m", "adam_v"):
            mine, theirs = getattr(got, group), getattr(expected, group)
            assert mine.keys() == theirs.keys()
            for name in mine:
                np.testing.assert_array_equal(mine[name], theirs[name], err_msg=f"run {seed}: {group}/{name}")
    engine.dispose()
