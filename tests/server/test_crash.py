"""kill -9 of bios serve mid-run: after a restart every session resumes at its last acknowledged
step with bit-identical weights, acknowledged gradients are kept, nothing is applied twice, and
requests that were running fail with a retryable error, which the clients retry at the same
sequence numbers, so their training loops carry on."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
from helpers import MODEL, random_batch
from server_process import ServerProcess

import bios
from bios import types
from bios.engine import CheckpointStore

KEY = "tml-crash-test-key-0000"
ADAM = types.AdamParams(learning_rate=1e-2, weight_decay=0.01)


def _weights(home, path: str) -> dict[str, np.ndarray]:
    """The LoRA weights of checkpoint `path` under BIOS_HOME `home`."""
    return CheckpointStore(home / "checkpoints").load(path, "inspected").weights


def _twin_weights(seed: int, steps: int, extra_gradient: bool = False) -> dict[str, np.ndarray]:
    """The weights an in-process emulator session reaches after the same acknowledged work."""
    twin = bios.ServiceClient(backend="emulator").create_lora_training_client(MODEL, rank=4, seed=seed)
    for step in range(steps):
        twin.forward_backward(random_batch(seed=100 * seed + step)).result()
        twin.optim_step(ADAM).result()
    if extra_gradient:
        twin.forward_backward(random_batch(seed=100 * seed + steps)).result()
        twin.optim_step(ADAM).result()
    return _weights_of(twin)


def _weights_of(client: bios.TrainingClient) -> dict[str, np.ndarray]:
    return _weights(Path(os.environ["BIOS_HOME"]), client.save_state(f"w-{time.monotonic_ns()}").result().path)


def _train_until_stopped(
    client: bios.TrainingClient,
    seed: int,
    stop: threading.Event,
    acknowledged: list[int],
    errors: list,
    progress: threading.Condition,
    ended: set[int],
) -> None:
    """Train until `stop` (or 40 steps, or an error); every acknowledged step, and the end
    (`seed` joins `ended`), is announced on `progress`."""
    step = 0
    try:
        while not stop.is_set() and step < 40:
            try:
                client.forward_backward(random_batch(seed=100 * seed + step)).result()
                acknowledged_step = client.optim_step(ADAM).result().step
            except bios.BiosError as exc:
                errors.append(exc)
                return
            with progress:
                acknowledged.append(acknowledged_step)
                progress.notify_all()
            step += 1
    finally:
        with progress:
            ended.add(seed)
            progress.notify_all()


def _assert_resumed_exactly(home, seed: int, client, steps: list[int], errors: list) -> None:
    """Session `seed` acknowledged `steps` in order, saw no error, and holds exactly the weights of
    an uninterrupted run of that many steps."""
    assert steps == list(range(1, len(steps) + 1)), f"session {seed}: steps acknowledged {steps}"
    assert errors == [], "the clients retry interrupted requests at their sequence numbers"
    info = client.get_info()
    assert info.step == len(steps), f"session {seed} resumed at {info.step}, last acknowledged {len(steps)}"
    got = _weights(home, client.save_state("after-crash").result().path)
    expected = _twin_weights(seed, len(steps))
    assert got.keys() == expected.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=f"session {seed}: {name}")


def test_sessions_resume_at_their_last_acknowledged_step_after_sigkill(tmp_path):
    home = tmp_path / "server-home"
    home.mkdir()
    server = ServerProcess(home, "--backend", "emulator", env={"BIOS_API_KEYS": KEY}).start()
    try:
        service = bios.ServiceClient(base_url=server.url, api_key=KEY)
        seeds = [1, 2, 3]
        sessions = {seed: service.create_lora_training_client(MODEL, rank=4, seed=seed) for seed in seeds}
        # a gradient acknowledged before the crash but not yet applied must survive it
        pending = service.create_lora_training_client(MODEL, rank=4, seed=9)
        for step in range(2):
            pending.forward_backward(random_batch(seed=900 + step)).result()
            pending.optim_step(ADAM).result()
        pending.forward_backward(random_batch(seed=902)).result()

        stop, progress, ended = threading.Event(), threading.Condition(), set()
        acknowledged = {seed: [] for seed in seeds}
        errors = {seed: [] for seed in seeds}
        threads = [
            threading.Thread(
                target=_train_until_stopped, args=(sessions[s], s, stop, acknowledged[s], errors[s], progress, ended)
            )
            for s in seeds
        ]
        for thread in threads:
            thread.start()
        with progress:
            progress.wait_for(lambda: all(len(acknowledged[s]) >= 3 or s in ended for s in seeds), timeout=120)
        server.kill()  # SIGKILL while requests are in flight
        before_restart = {s: len(acknowledged[s]) for s in seeds}
        server.start()
        with progress:  # every training loop carries on after the restart (or has ended)
            progress.wait_for(lambda: all(len(acknowledged[s]) > before_restart[s] or s in ended for s in seeds), 120)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)

        print(
            "steps acknowledged and errors per session:",
            {s: (len(acknowledged[s]), [type(e).__name__ for e in errors[s]]) for s in seeds},
        )
        for seed, client in sessions.items():
            _assert_resumed_exactly(home, seed, client, acknowledged[seed], errors[seed])

        assert pending.get_info().step == 2
        pending.optim_step(ADAM).result()
        got = _weights(home, pending.save_state("replayed").result().path)
        expected = _twin_weights(9, 2, extra_gradient=True)
        for name in got:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"replayed gradient: {name}")
    finally:
        server.stop()


def test_sampling_clients_and_session_metadata_are_served_again_after_a_restart(tmp_path):
    server = ServerProcess(tmp_path, "--backend", "emulator", env={"BIOS_API_KEYS": KEY}).start()
    try:
        service = bios.ServiceClient(base_url=server.url, api_key=KEY, user_metadata={"team": "bios"})
        training = service.create_lora_training_client(MODEL, rank=4, seed=5, user_metadata={"run": "a"})
        training.train(random_batch(seed=5), learning_rate=1e-2)
        tuned = training.save_weights_and_get_sampling_client("for-sampling")
        base = service.create_sampling_client(base_model=MODEL)
        prompt, greedy = types.ModelInput.from_ints([7, 300, 41]), types.SamplingParams(max_tokens=6, temperature=0.0)
        before = [client.sample(prompt, greedy).result().sequences[0].tokens for client in (tuned, base)]
        server.kill()
        server.start()
        after = [client.sample(prompt, greedy).result().sequences[0].tokens for client in (tuned, base)]
        assert after == before and before[0] != before[1]
        assert training.get_info().user_metadata == {"team": "bios", "run": "a"}
    finally:
        server.stop()


def test_a_database_of_an_earlier_bios_gains_its_missing_columns_and_the_indexes(tmp_path):
    import sqlalchemy

    from bios.server.db import Records, RequestRow, connect

    url = f"sqlite:///{tmp_path / 'earlier.db'}"
    earlier = sqlalchemy.create_engine(url)
    with earlier.begin() as db:
        db.execute(
            sqlalchemy.text(
                "CREATE TABLE requests (request_id VARCHAR(64) PRIMARY KEY, owner VARCHAR(64) NOT NULL, "
                "kind VARCHAR(32) NOT NULL, session_id VARCHAR(64), seq INTEGER, idempotency_key VARCHAR(256), "
                "body_hash VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, answer BLOB, replay BLOB, "
                "created_at FLOAT NOT NULL, finished_at FLOAT)"
            )
        )
        db.execute(
            sqlalchemy.text(
                "CREATE TABLE sessions (session_id VARCHAR(64) PRIMARY KEY, owner VARCHAR(64) NOT NULL, "
                "base_model VARCHAR(256) NOT NULL, created_at FLOAT NOT NULL)"
            )
        )
        db.execute(
            sqlalchemy.text(
                "CREATE TABLE checkpoints (path VARCHAR(512) PRIMARY KEY, owner VARCHAR(64) NOT NULL, "
                "session_id VARCHAR(64) NOT NULL, created_at FLOAT NOT NULL)"
            )
        )
    earlier.dispose()
    records = Records(connect(url))
    records.add_request(
        RequestRow("req-1", "owner", "tinker.optim_step", "s", 0, None, "-", "pending", None, None, b"{}")
    )
    assert [row.body for row in records.pending_requests()] == [b"{}"]
    records.finish_requests([("req-1", "done", b"J{}")])
    finished = records.request("req-1")
    assert finished is not None and finished.body is None and records.pending_requests() == []
    indexes = {index["name"] for index in sqlalchemy.inspect(records.engine).get_indexes("requests")}
    assert {"requests_by_session", "requests_by_finish"} <= indexes
    records.add_session("s", "owner", "bios/tiny", {"team": "bios"})
    assert records.session_metadata("s") == {"team": "bios"}
