"""What the service simulator costs in real time, and what it projects.

    python bench/simulator.py --steps 1000

Runs the same SFT loop (forward_backward + optim_step on the built-in model) on the plain
emulator, under a fault-free simulation of Llama-3.1-8B on 8×H100, and under the faults of
examples/profiles/faults.toml. For each run it prints the real seconds per step and, for the
simulated runs, the simulated wall time and the projected cost from the report. The simulator
never sleeps, so its overhead is its bookkeeping on top of the emulator's arithmetic.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import bios
from bios import types
from bios.simulation import SimulationConfig

REPO = Path(__file__).resolve().parents[1]


def run(steps: int, simulation: SimulationConfig | None) -> tuple[float, bios.SimulationReport | None]:
    """(real seconds, the simulator's report) of `steps` SFT steps."""
    service = bios.ServiceClient(backend="emulator", simulation=simulation)
    training = service.create_lora_training_client("bios/tiny", rank=8, seed=0)
    ids = training.get_tokenizer().encode("a short sequence for timing the simulator's bookkeeping")
    batch = [
        types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]})
    ] * 4
    start = time.perf_counter()
    for _ in range(steps):
        backward = training.forward_backward(batch)
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        backward.result()
    return time.perf_counter() - start, service.simulation_report()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        import os

        os.environ["BIOS_HOME"] = home
        runs = {
            "emulator": None,
            "simulated 8xH100 Llama-3.1-8B": SimulationConfig.from_toml(
                REPO / "examples" / "profiles" / "h100x8-llama8b.toml"
            ),
            "simulated faults.toml": SimulationConfig.from_toml(REPO / "examples" / "profiles" / "faults.toml"),
        }
        baseline = None
        for name, simulation in runs.items():
            seconds, report = run(args.steps, simulation)
            baseline = baseline or seconds
            print(
                f"{name:32s} {1e3 * seconds / args.steps:7.3f} ms/step real  ({seconds / baseline:4.2f}x the emulator)"
            )
            if report is not None:
                print("    " + "\n    ".join(report.text.splitlines()))


if __name__ == "__main__":
    main()
