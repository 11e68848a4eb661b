"""What the JAX benchmarks measure, through the public API: LoRA training steps of one or many
sessions, and batched decoding, with the figures derived from them (bios/accounting.py).

Requests of many sessions reach the backend together only if they are queued before the
engine's worker takes its next round; `one_round` holds the worker while they are sent, so
the forward_backward calls of N sessions become one device call (and their optim_steps another).
The engine is the in-process one, `ServiceClient.transport`.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import numpy as np

import bios
from backends.jax import compiled
from bios import types
from bios.accounting import decode_bytes, device_peaks, lora_step_flops
from bios.catalog import ModelSpec
from bios.engine import Engine

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections an adapter trains by default (LoraConfig): all linear layers but lm_head."""
ADAM = types.AdamParams(learning_rate=1e-4)
MAX_SAMPLES = 128
"""Samples one sample request may ask for (validation's limit)."""
REPEATS = 3
"""Timed runs of each length in time_decoding; the fastest counts."""


def engine(service: bios.ServiceClient) -> Engine:
    """The in-process engine behind `service`; TypeError for a remote one."""
    transport = service.transport
    if not isinstance(transport, Engine):
        raise TypeError("the benchmarks drive the in-process engine; got a remote transport")
    return transport


@contextlib.contextmanager
def one_round(service: bios.ServiceClient) -> Iterator[None]:
    """Requests sent inside the block join the engine's same round: its worker is held (by a
    call that waits) until the block ends. Rounds already running finish first. RuntimeError
    for an engine without a worker (one that runs requests inline)."""
    scheduler = engine(service).scheduler
    if scheduler.inline:
        raise RuntimeError("this engine runs requests inline (a simulation): it has no worker to hold")
    held, release = threading.Event(), threading.Event()
    done = scheduler.call(lambda: (held.set(), release.wait()))
    held.wait()
    try:
        yield
    finally:
        release.set()
        done.result()


def random_data(spec: ModelSpec, rows: int, length: int, rng: np.random.Generator) -> list[types.Datum]:
    """`rows` data of `length` random tokens with random targets (cross-entropy inputs)."""
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(rng.integers(0, spec.vocab_size, length).tolist()),
            loss_fn_inputs={"target_tokens": rng.integers(0, spec.vocab_size, length).tolist()},
        )
        for _ in range(rows)
    ]


@dataclass(frozen=True)
class Training:
    """Timing of training steps (one step: every session's forward_backward, then its optim_step)."""

    first_step_s: float
    """The first step, compilation included."""
    new_programs: int
    """Programs the first step compiled or loaded from the persistent cache."""
    step_s: float
    """A steady step: the mean of the timed steps."""
    recompiles: int
    """Programs compiled during the timed steps (0 in a steady state)."""
    backend_calls_per_step: float
    """Backend calls the engine made per timed step (2 when all sessions batch together)."""


def time_training(
    service: bios.ServiceClient, clients: list[bios.TrainingClient], data: list[list[types.Datum]], steps: int
) -> Training:
    """One untimed step, then `steps` timed ones; client i trains on `data[i]` each step, all
    clients' requests of a step sent in one round, steps pipelined (the next is sent before
    the last finishes)."""
    scheduler = engine(service).scheduler

    def step() -> list[bios.BiosFuture]:
        with one_round(service):
            futures: list[bios.BiosFuture] = [c.forward_backward(d) for c, d in zip(clients, data)]
            futures += [client.optim_step(ADAM) for client in clients]
        return futures

    before = sum(compiled.compile_counts().values())
    started = time.perf_counter()
    for future in step():
        future.result()
    first = time.perf_counter() - started
    programs, calls = sum(compiled.compile_counts().values()), scheduler.backend_calls
    started = time.perf_counter()
    for future in [future for _ in range(steps) for future in step()]:
        future.result()
    elapsed = time.perf_counter() - started
    return Training(
        first_step_s=first,
        new_programs=programs - before,
        step_s=elapsed / steps,
        recompiles=sum(compiled.compile_counts().values()) - programs,
        backend_calls_per_step=(scheduler.backend_calls - calls) / steps,
    )


def training_figures(spec: ModelSpec, timing: Training, rows: int, length: int, rank: int) -> dict[str, float | None]:
    """Tokens/s, model TFLOP/s (lora_step_flops) and MFU (None on a device without a peak
    figure) of `timing`, for `rows` x `length` tokens per step at LoRA rank `rank`."""
    flops = lora_step_flops(spec, rows, length, rank, MODULES) / timing.step_s
    peaks = device_peaks(jax.devices()[0].device_kind)
    return {
        "tokens_per_s": rows * length / timing.step_s,
        "model_tflops": flops / 1e12,
        "mfu": flops / (peaks[0] * len(jax.devices())) if peaks else None,
    }


def time_sampling(
    service: bios.ServiceClient,
    sampler: bios.SamplingClient,
    prompts: list[list[int]],
    samples: int,
    max_tokens: int,
) -> tuple[float, int]:
    """(seconds, tokens generated) for `samples` greedy completions of each prompt, all sent
    in one round so that they decode side by side."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    started = time.perf_counter()
    with one_round(service):
        futures = [sampler.sample(types.ModelInput.from_ints(p), params, num_samples=samples) for p in prompts]
    results = [future.result() for future in futures]
    return time.perf_counter() - started, sum(len(s.tokens) for r in results for s in r.sequences)


def decode_prompts(
    spec: ModelSpec, rows: int, prompt_length: int, rng: np.random.Generator
) -> tuple[list[list[int]], int]:
    """(prompts, samples of each) filling `rows` decode rows with as few random prompts of
    `prompt_length` tokens as a request's MAX_SAMPLES allow. ValueError if `rows` is over
    MAX_SAMPLES and not a multiple of it."""
    count = math.ceil(rows / MAX_SAMPLES)
    if rows % count:
        raise ValueError(f"rows must be at most {MAX_SAMPLES} or a multiple of it, got {rows}")
    return [rng.integers(0, spec.vocab_size, prompt_length).tolist() for _ in range(count)], rows // count


@dataclass(frozen=True)
class Decoding:
    """Timing of `rows` sequences decoded side by side."""

    rows: int
    warmup_s: float
    """Both runs below once each, compilation included."""
    prefill_s: float
    """A run to one new token per row: prefill (and one choice)."""
    decode_step_s: float
    """One more token for every row: (run to max_tokens − prefill run) / (max_tokens − 1)."""
    recompiles: int
    """Programs compiled during the timed runs (0 in a steady state)."""


def time_decoding(
    service: bios.ServiceClient, sampler: bios.SamplingClient, prompts: list[list[int]], samples: int, max_tokens: int
) -> Decoding:
    """Greedy decoding of `samples` rows per prompt, all side by side: a warm-up of both runs,
    then the fastest of REPEATS runs to one token (prefill) and of REPEATS to `max_tokens`
    (waits for a core only ever add time). The decode step is their difference per token, so
    on a tiny model and a busy machine it can come out at or below zero. ValueError if a run
    generates other than rows x its token count (a stop fired)."""
    rows = len(prompts) * samples

    def run(tokens: int) -> float:
        seconds, generated = time_sampling(service, sampler, prompts, samples, tokens)
        if generated != rows * tokens:
            raise ValueError(f"expected {rows * tokens} tokens, {generated} were generated")
        return seconds

    warmup = run(max_tokens) + run(1)
    programs = sum(compiled.compile_counts().values())
    prefill = min(run(1) for _ in range(REPEATS))
    total = min(run(max_tokens) for _ in range(REPEATS))
    return Decoding(
        rows=rows,
        warmup_s=warmup,
        prefill_s=prefill,
        decode_step_s=(total - prefill) / max(max_tokens - 1, 1),
        recompiles=sum(compiled.compile_counts().values()) - programs,
    )


def decoding_figures(spec: ModelSpec, timing: Decoding, context: int, weight_bytes: int) -> dict[str, float | None]:
    """Decode tokens/s, GB/s read (decode_bytes at a mean `context` of positions per row) and
    the fraction of the device's HBM bandwidth (None without a peak figure) of `timing`."""
    moved = decode_bytes(spec, timing.rows, context, weight_bytes) / timing.decode_step_s
    peaks = device_peaks(jax.devices()[0].device_kind)
    return {
        "tokens_per_s": timing.rows / timing.decode_step_s,
        "gb_per_s": moved / 1e9,
        "hbm_util": moved / peaks[1] if peaks else None,
    }
