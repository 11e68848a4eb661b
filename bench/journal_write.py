"""Cost of the server's durability: writing one session's state to the journal.

    python bench/journal_write.py --params 1e5 1e6 2e7 8.4e7

For each LoRA size (parameters; the state is weights + two Adam moments, float32), times
`Journal.write` (one safetensors file, atomically replaced) and `Journal.read`, and prints
MB/s. `bios serve` does one write per acknowledged optim_step, off the engine's thread; for
reference, rank-32 LoRA on every projection of Llama-3.1-8B has about 8.4e7 parameters.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bios.backend import AdapterSpec, AdapterState
from bios.server.journal import Journal


def state_of(params: int) -> AdapterState:
    """A state of `params` LoRA parameters split into 64 tensors (values are irrelevant)."""
    shape = (max(1, params // 64 // 256), 256)
    tensors = {f"layer{i}.lora_A": np.random.default_rng(i).standard_normal(shape, dtype=np.float32) for i in range(64)}
    spec = AdapterSpec(adapter_id="bench", base_model="bios/tiny", rank=32, alpha=64.0, target_modules=("q_proj",))
    return AdapterState(spec=spec, step=1, weights=tensors, adam_m=dict(tensors), adam_v=dict(tensors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[1e5, 1e6, 2e7])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    journal = Journal(Path(tempfile.mkdtemp(prefix="bios-journal-")))
    for params in args.params:
        state = state_of(int(params))
        size = 3 * sum(a.nbytes for a in state.weights.values())
        writes, reads = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            journal.write("bench", state, 0, "req", b'{"status":"done"}')
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            journal.read("bench")
            reads.append(time.perf_counter() - started)
        write, read = min(writes), min(reads)
        print(
            f"{params:9.2g} LoRA params  {size / 1e6:8.1f} MB state   "
            f"write {1000 * write:8.1f} ms ({size / write / 1e6:6.0f} MB/s)"
            f"   read {1000 * read:8.1f} ms"
        )


if __name__ == "__main__":
    main()
