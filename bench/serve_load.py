"""Load: many client processes train against one `bios serve` at once.

    python bench/serve_load.py --clients 32 --steps 50               # emulator backend, bios/tiny
    python bench/serve_load.py --clients 32 --steps 50 --backend jax

Each client process opens a session and runs `steps` rounds of forward_backward + optim_step
(pipelined: both submitted before waiting), timing every request from submission to result.
Afterwards it checks that every step was acknowledged exactly once and in order (optim_step
results 1..steps), that each session's final weights are bit-identical to an in-process
emulator session that did the same work (no update lost or applied twice; emulator backend
only), and prints p50/p99 latency per request kind and backend calls versus requests.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from server_process import ServerProcess

import bios
from bios import types
from bios.engine import CheckpointStore

MODEL = "bios/tiny"
ADAM = types.AdamParams(learning_rate=1e-3)
KEY = "tml-load-benchmark-key"


def _batch(seed: int, step: int) -> list[types.Datum]:
    rng = np.random.default_rng(1000 * seed + step)
    tokens = [rng.integers(4, 4096, 17).tolist() for _ in range(2)]
    return [
        types.Datum(model_input=types.ModelInput.from_ints(t[:-1]), loss_fn_inputs={"target_tokens": t[1:]})
        for t in tokens
    ]


def client(url: str, seed: int, steps: int, results: multiprocessing.Queue) -> None:
    """One client process: a session, `steps` pipelined rounds, then its checkpoint path."""
    training = bios.ServiceClient(base_url=url, api_key=KEY).create_lora_training_client(MODEL, rank=8, seed=seed)
    latencies: dict[str, list[float]] = {"forward_backward": [], "optim_step": []}
    acknowledged = []
    for step in range(steps):
        fb_sent = time.perf_counter()
        fb = training.forward_backward(_batch(seed, step))
        opt_sent = time.perf_counter()
        opt = training.optim_step(ADAM)
        fb.result()
        latencies["forward_backward"].append(time.perf_counter() - fb_sent)
        acknowledged.append(opt.result().step)
        latencies["optim_step"].append(time.perf_counter() - opt_sent)
    results.put((seed, acknowledged, latencies, training.save_state("final").result().path))


def reference_weights(seed: int, steps: int) -> dict[str, np.ndarray]:
    twin = bios.ServiceClient(backend="emulator").create_lora_training_client(MODEL, rank=8, seed=seed)
    for step in range(steps):
        twin.forward_backward(_batch(seed, step))
        twin.optim_step(ADAM)
    path = twin.save_state("reference").result().path
    return CheckpointStore(Path(os.environ["BIOS_HOME"]) / "checkpoints").load(path, "x").weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--backend", default="emulator")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bios-load-"))
    os.environ["BIOS_HOME"] = str(home / "client")
    with ServerProcess(home, "--backend", args.backend, env={"BIOS_OPERATOR_KEYS": KEY}) as server:
        context = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue = context.Queue()
        processes = [
            context.Process(target=client, args=(server.url, seed, args.steps, results)) for seed in range(args.clients)
        ]
        started = time.perf_counter()
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=3600) for _ in processes]
        wall = time.perf_counter() - started
        for process in processes:
            process.join()
        engine = httpx.get(f"{server.url}/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()["server"]

    problems = []
    latencies: dict[str, list[float]] = {"forward_backward": [], "optim_step": []}
    for seed, acknowledged, timings, path in sorted(outcomes):
        if acknowledged != list(range(1, args.steps + 1)):
            problems.append(f"session {seed}: steps acknowledged {acknowledged[:5]}... not 1..{args.steps} in order")
        for kind, values in timings.items():
            latencies[kind].extend(values)
        if args.backend == "emulator":
            got = CheckpointStore(home / "checkpoints").load(path, "x").weights
            expected = reference_weights(seed, args.steps)
            if any(not np.array_equal(got[k], expected[k]) for k in expected):
                problems.append(f"session {seed}: final weights differ from the reference")
    requests = args.clients * (2 * args.steps + 1)  # + the final save_state
    print(
        f"{args.clients} clients x {args.steps} steps on {args.backend}: {wall:.1f} s wall, "
        f"{args.clients * args.steps / wall:.1f} steps/s"
    )
    for kind, values in latencies.items():
        ms = 1000 * np.asarray(values)
        print(
            f"  {kind:17s} latency p50 {np.percentile(ms, 50):7.1f} ms "
            f"  p99 {np.percentile(ms, 99):7.1f} ms   (n={ms.size})"
        )
    print(
        f"  engine: {engine['jobs_run']} jobs in {engine['backend_calls']} backend calls "
        f"({engine['jobs_run'] / max(engine['backend_calls'], 1):.1f} jobs per call; {requests} client requests)"
    )
    print(
        "  every step acknowledged once, in order; weights match the reference" if not problems else "\n".join(problems)
    )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
