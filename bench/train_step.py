"""Benchmark: LoRA training steps (forward_backward + optim_step) on the JAX backend.

    python bench/train_step.py --model bios/tiny --batch 8 --length 128 --steps 10
    python bench/train_step.py --model llama-8b --batch 8 --length 2048   # on a GPU

Prints compile time, tokens/s and, on a known GPU, model FLOP utilisation (bios/accounting.py).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from presets import PRESETS, open_model

from backends.jax import compiled
from bios import types
from bios.accounting import device_peaks, lora_step_flops

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    rng = np.random.default_rng(0)
    batch = [
        types.Datum(
            model_input=types.ModelInput.from_ints(rng.integers(0, spec.vocab_size, args.length).tolist()),
            loss_fn_inputs={"target_tokens": rng.integers(0, spec.vocab_size, args.length).tolist()},
        )
        for _ in range(args.batch)
    ]
    adam = types.AdamParams(learning_rate=1e-4)

    started = time.perf_counter()
    client.forward_backward(batch)
    client.optim_step(adam).result()
    compile_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for _ in range(args.steps):
        client.forward_backward(batch)
        client.optim_step(adam)
    client.optim_step(adam).result()
    step = (time.perf_counter() - started) / args.steps
    tokens = args.batch * args.length
    flops = lora_step_flops(spec, args.batch, args.length, args.rank, MODULES)
    device = jax.devices()[0]
    print(f"model {spec.name}: {spec.n_params / 1e9:.2f} B params, {len(jax.devices())} x {device.device_kind}")
    print(f"batch {args.batch} x {args.length} tokens, rank {args.rank}, dtype {service._transport.backend.dtype}")
    print(f"first step (compilation included): {compile_seconds:.2f} s; programs: {compiled.compile_counts()}")
    print(f"step: {step * 1e3:.1f} ms   tokens/s: {tokens / step:,.0f}   model TFLOP/s: {flops / step / 1e12:.2f}")
    peaks = device_peaks(device.device_kind)
    if peaks:
        print(f"MFU: {flops / step / (peaks[0] * len(jax.devices())):.1%} of {peaks[0] / 1e12:.0f} TFLOP/s per device")
    else:
        print("MFU: n/a (no peak figure for this device)")


if __name__ == "__main__":
    main()
