"""What one training step costs through `bios serve` on loopback, against the same step in-process.

    python bench/http_step.py --steps 200                      # emulator and JAX backends
    python bench/http_step.py --steps 200 --backends emulator

For each backend, times `steps` steps (forward_backward + optim_step of one 64-token datum on
bios/tiny, each waited for before the next) three ways: (a) the official Tinker SDK 0.38 (a
child process, as tests/server run it) against `bios serve --no-auth`, (b) Bios's remote
client against the same server, (c) Bios in-process on the same backend; and one greedy
`sample` of 4 tokens each way; and with Bios's clients, the same step as one `train()` call.
Prints p50 and p99 per step (or sample) and the HTTP overhead per request: (served p50 -
in-process p50) / requests per round. Wall times on a busy machine
are mostly waits for a core, so it also prints the CPU time per request over the timed rounds
of the in-process run, and of the server and the client when served: what the work costs,
whatever the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL = "bios/tiny"
TOKENS = 64
WARMUP = 10
SAMPLES = 50


def _tokens(step: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(step).integers(4, 4096, TOKENS + 1).tolist()


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    """(p50, p99) of `seconds`, in milliseconds."""
    import numpy as np

    return float(np.percentile(seconds, 50) * 1e3), float(np.percentile(seconds, 99) * 1e3)


def _timed(steps: int, step, sample, probes: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """`step(i)` for WARMUP + `steps` rounds and `sample()` for WARMUP + SAMPLES rounds, timing
    all but the warm-up ones (seconds), and the CPU seconds each of `probes` (name → CPU seconds
    used so far by a process) counts over the timed rounds (under "cpu NAME")."""
    times: dict[str, list[float]] = {"step": [], "sample": []}
    cpu = dict.fromkeys(probes, 0.0)
    for kind, rounds, run in (("step", steps, step), ("sample", SAMPLES, lambda _i: sample())):
        for i in range(WARMUP + rounds):
            if i == WARMUP:
                started = {name: probe() for name, probe in probes.items()}
            start = time.perf_counter()
            run(i)
            if i >= WARMUP:
                times[kind].append(time.perf_counter() - start)
        for name, probe in probes.items():
            cpu[name] += probe() - started[name]
    return {**times, **{f"cpu {name}": [seconds] for name, seconds in cpu.items()}}


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds used so far by process `pid` (this process when None)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _probes(server_pid: int | None) -> dict[str, Callable[[], float]]:
    """The CPU probes of a run: this process as "client" (as "in-process" without a server), and
    the server's process."""
    if server_pid is None:
        return {"in-process": _cpu_s}
    return {"server": lambda: _cpu_s(server_pid), "client": _cpu_s}


def bios_client(steps: int, server_pid: int | None = None, **client_args: str) -> dict[str, list[float]]:
    """The rounds timed with Bios's own client (`base_url=` for the remote one, served by process
    `server_pid`; `backend=` in-process)."""
    import bios
    from bios import types

    training = bios.ServiceClient(**client_args).create_lora_training_client(MODEL, rank=8, seed=0)
    times = _rounds(steps, training, training.save_weights_and_get_sampling_client("bench"), types, server_pid)
    return times | {"train": _trained(steps, training, types)}


def _trained(steps: int, training: Any, types: Any) -> list[float]:
    """Seconds of each of `steps` `train()` calls (after WARMUP): Bios's one-call step, whose
    forward_backward and optim_step are sent together (and run fused where the backend can)."""
    seconds = []
    for i in range(WARMUP + steps):
        t = _tokens(i)
        datum = types.Datum(model_input=types.ModelInput.from_ints(t[:-1]), loss_fn_inputs={"target_tokens": t[1:]})
        start = time.perf_counter()
        training.train([datum], learning_rate=1e-3)
        if i >= WARMUP:
            seconds.append(time.perf_counter() - start)
    return seconds


def sdk_client(url: str, steps: int, server_pid: int) -> dict[str, list[float]]:
    """The rounds timed with the official Tinker SDK (only `tinker`, numpy and psutil imported)
    against the server at `url`, process `server_pid`."""
    import tinker
    from tinker import types

    training = tinker.ServiceClient(base_url=url, api_key="tml-bench-key").create_lora_training_client(
        MODEL, rank=8, seed=0
    )
    return _rounds(steps, training, training.save_weights_and_get_sampling_client(), types, server_pid)


def _rounds(steps: int, training: Any, sampler: Any, types: Any, server_pid: int | None) -> dict[str, list[float]]:
    """`steps` training steps and SAMPLES samples through `training` and `sampler`, clients of
    either API (`types` is that API's types module)."""
    adam = types.AdamParams(learning_rate=1e-3)

    def step(i: int) -> None:
        t = _tokens(i)
        datum = types.Datum(model_input=types.ModelInput.from_ints(t[:-1]), loss_fn_inputs={"target_tokens": t[1:]})
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(adam).result()

    prompt = types.ModelInput.from_ints(_tokens(0)[:16])
    params = types.SamplingParams(max_tokens=4, temperature=0.0)
    return _timed(
        steps,
        step,
        lambda: sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result(),
        _probes(server_pid),
    )


def _sdk_in_child(url: str, steps: int, server_pid: int) -> dict[str, list[float]]:
    """`sdk_client` in a child process whose path holds the pinned SDK release (tests/support)."""
    from tinker_sdk import sdk_directory

    env = {**os.environ, "PYTHONPATH": str(sdk_directory("0.38.0")), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--sdk-child", url, "--server-pid", str(server_pid), "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the SDK child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(name: str, times: dict[str, list[float]], local: dict[str, list[float]] | None, steps: int) -> str:
    step50, step99 = _percentiles(times["step"])
    sample50, sample99 = _percentiles(times["sample"])
    row = f"  {name:<18} step p50 {step50:7.2f} ms  p99 {step99:7.2f} ms"
    row += f"   sample p50 {sample50:6.2f} ms  p99 {sample99:6.2f} ms"
    if local is not None:
        step_over = (step50 - _percentiles(local["step"])[0]) / 2
        sample_over = sample50 - _percentiles(local["sample"])[0]
        row += f"   overhead/request: step {step_over:5.2f} ms, sample {sample_over:5.2f} ms"
    if "train" in times:
        train50, train99 = _percentiles(times["train"])
        row += f"\n  {'':<18} train() p50 {train50:7.2f} ms  p99 {train99:7.2f} ms"
    requests = 2 * steps + SAMPLES
    cpu = ", ".join(
        f"{key.removeprefix('cpu ')} {seconds[0] * 1e3 / requests:5.2f} ms"
        for key, seconds in times.items()
        if key.startswith("cpu ")
    )
    return row + f"\n  {'':<18} CPU per request: {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backends", nargs="+", default=["emulator", "jax"])
    parser.add_argument("--sdk-child", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sdk_child:
        print(json.dumps(sdk_client(args.sdk_child, args.steps, args.server_pid)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ["BIOS_HOME"] = tempfile.mkdtemp(prefix="bios-http-step-")
    from server_process import ServerProcess

    print(f"{args.steps} steps of forward_backward + optim_step (one {TOKENS}-token datum, {MODEL}), {SAMPLES} samples")
    for backend in args.backends:
        local = bios_client(args.steps, backend=backend)
        with ServerProcess(os.environ["BIOS_HOME"], "--backend", backend, "--no-auth") as server:
            assert server.process is not None
            remote = bios_client(args.steps, server.process.pid, base_url=server.url)
            sdk = _sdk_in_child(server.url, args.steps, server.process.pid)
        print(f"{backend}:")
        print(_row("in-process", local, None, args.steps))
        print(_row("Bios remote client", remote, local, args.steps))
        print(_row("Tinker SDK 0.38", sdk, local, args.steps))


if __name__ == "__main__":
    main()
