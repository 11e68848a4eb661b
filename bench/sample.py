"""Benchmark: batched sampling (prefill + KV-cached decode) on the JAX backend.

    python bench/sample.py --model bios/tiny --prompts 8 --prompt-length 64 --max-tokens 64
    python bench/sample.py --model llama-8b --prompts 32 --prompt-length 512 --max-tokens 256   # on a GPU

Decode time is the difference between a run to `max_tokens` and a run to one token (prefill
only); bandwidth utilisation counts weights plus KV cache read per step (bios/accounting.py).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from presets import PRESETS, open_model

import bios
from backends.jax import compiled
from bios import types
from bios.accounting import decode_bytes, device_peaks


def _timed(sampler: bios.SamplingClient, prompts: list[list[int]], max_tokens: int, temperature: float) -> float:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=0)
    started = time.perf_counter()
    futures = [sampler.sample(types.ModelInput.from_ints(p), params) for p in prompts]
    for future in futures:
        future.result()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bios/tiny", help=f"catalog name or preset {list(PRESETS)}")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each length; the fastest counts")
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()

    service, spec = open_model(args.model, args.dtype)
    sampler = service.create_lora_training_client(spec.name, rank=8).save_weights_and_get_sampling_client("bench")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, spec.vocab_size, args.prompt_length).tolist() for _ in range(args.prompts)]

    def timed(max_tokens: int) -> float:
        return _timed(sampler, prompts, max_tokens, args.temperature)

    warm = timed(args.max_tokens) + timed(1)  # compiles both shapes
    prefill = min(timed(1) for _ in range(args.repeats))
    total = min(timed(args.max_tokens) for _ in range(args.repeats))
    decode_step = (total - prefill) / max(args.max_tokens - 1, 1)
    device = jax.devices()[0]
    weight_bytes = service._transport.backend.dtype.itemsize
    moved = decode_bytes(spec, args.prompts, args.prompt_length + args.max_tokens // 2, weight_bytes)
    print(f"model {spec.name}: {spec.n_params / 1e9:.2f} B params, {len(jax.devices())} x {device.device_kind}")
    print(
        f"{args.prompts} prompts x {args.prompt_length} tokens, {args.max_tokens} new tokens each, "
        f"temperature {args.temperature}"
    )
    print(f"warm-up (compilation included): {warm:.2f} s; programs: {compiled.compile_counts()}")
    print(
        f"prefill: {prefill * 1e3:.1f} ms   decode step: {decode_step * 1e3:.2f} ms   "
        f"decode tokens/s: {args.prompts / decode_step:,.0f}"
    )
    peaks = device_peaks(device.device_kind)
    if peaks:
        print(f"decode bandwidth: {moved / decode_step / 1e9:.0f} GB/s = {moved / decode_step / peaks[1]:.1%} of peak")
    else:
        print(f"decode bandwidth: {moved / decode_step / 1e9:.2f} GB/s (no peak figure for this device)")


if __name__ == "__main__":
    main()
