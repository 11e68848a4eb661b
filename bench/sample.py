"""Benchmark: batched sampling (prefill + KV-cached decode) on the JAX backend.

    python bench/sample.py --model bios/tiny --prompts 8 --prompt-length 64 --max-tokens 64
    python bench/sample.py --model llama-8b --prompts 32 --prompt-length 512 --max-tokens 256   # on a GPU

Decode time is the difference between a run to `max_tokens` and a run to one token (prefill
only); bandwidth utilisation counts weights plus KV cache read per step (bios/accounting.py).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from presets import PRESETS, open_model
from workloads import decoding_figures, time_decoding

from backends.jax import compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bios/tiny", help=f"catalog name or preset {list(PRESETS)}")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1, help="samples of each prompt (decode rows per prompt)")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()

    rows = args.prompts * args.samples
    service, spec = open_model(args.model, args.dtype, decode_rows=str(rows))
    sampler = service.create_lora_training_client(spec.name, rank=8).save_weights_and_get_sampling_client("bench")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, spec.vocab_size, args.prompt_length).tolist() for _ in range(args.prompts)]
    timing = time_decoding(service, sampler, prompts, args.samples, args.max_tokens)
    weight_bytes = service.transport.backend.dtype.itemsize
    figures = decoding_figures(spec, timing, args.prompt_length + args.max_tokens // 2, weight_bytes)
    device = jax.devices()[0]
    print(f"model {spec.name}: {spec.n_params / 1e9:.2f} B params, {len(jax.devices())} x {device.device_kind}")
    print(f"{rows} rows: {args.prompts} prompts x {args.prompt_length} tokens, {args.max_tokens} new tokens (greedy)")
    print(f"warm-up (compilation included): {timing.warmup_s:.2f} s; programs: {compiled.compile_counts()}")
    print(
        f"prefill: {timing.prefill_s * 1e3:.1f} ms   decode step: {timing.decode_step_s * 1e3:.2f} ms   "
        f"decode tokens/s: {figures['tokens_per_s']:,.0f}   recompiles while timed: {timing.recompiles}"
    )
    util = figures["hbm_util"]
    print(f"decode bandwidth: {figures['gb_per_s']:.1f} GB/s" + (f" = {util:.1%} of peak" if util is not None else ""))


if __name__ == "__main__":
    main()
