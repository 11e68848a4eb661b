"""Benchmark: LoRA training steps (forward_backward + optim_step) on the JAX backend.

    python bench/train_step.py --model bios/tiny --batch 8 --length 128 --steps 10
    python bench/train_step.py --model llama-8b --batch 8 --length 2048   # on a GPU

Prints compile time, tokens/s and, on a known GPU, model FLOP utilisation (bios/accounting.py).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from presets import PRESETS, open_model
from workloads import random_data, time_training, training_figures

from backends.jax import compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bios/tiny", help=f"catalog name or preset {list(PRESETS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the backend's)")
    args = parser.parse_args()

    service, spec = open_model(args.model, args.dtype)
    client = service.create_lora_training_client(spec.name, rank=args.rank)
    data = random_data(spec, args.batch, args.length, np.random.default_rng(0))
    timing = time_training(service, [client], [data], args.steps)
    figures = training_figures(spec, timing, args.batch, args.length, args.rank)
    device = jax.devices()[0]
    print(f"model {spec.name}: {spec.n_params / 1e9:.2f} B params, {len(jax.devices())} x {device.device_kind}")
    print(f"batch {args.batch} x {args.length} tokens, rank {args.rank}, dtype {service.transport.backend.dtype}")
    print(f"first step (compilation included): {timing.first_step_s:.2f} s; programs: {compiled.compile_counts()}")
    print(
        f"step: {timing.step_s * 1e3:.1f} ms   tokens/s: {figures['tokens_per_s']:,.0f}   "
        f"model TFLOP/s: {figures['model_tflops']:.2f}   recompiles while timed: {timing.recompiles}"
    )
    mfu = figures["mfu"]
    print(f"MFU: {mfu:.1%} of the device's dense bf16 peak" if mfu is not None else "MFU: n/a (no peak figure)")


if __name__ == "__main__":
    main()
