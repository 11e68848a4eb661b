"""Benchmark: the same LoRA job on Bios JAX and on Hugging Face transformers + PEFT (torch), in one process.

    BIOS_HOME=~/.bios python bench/side_by_side.py --steps 25

Needs SmolLM2-135M-Instruct installed in `$BIOS_HOME/models` (`make models`, or
`bios models fetch smollm2-135m-instruct`), and torch, transformers and peft.

The job: teach invented facts from 4 chats (chat template, loss summed over the assistant's
tokens), LoRA rank 16 with Bios's default alpha (2 * rank) on every projection of every layer,
AdamW at lr 2e-3 with Bios's default betas, eps and weight decay, float32, `--steps` steps. Then
8 samples of 64 tokens at temperature 1 from the trained adapter (Bios `sample`, HF `generate`
with the PEFT adapter unmerged). Prints, for both: first-step time, median s/step of the rest,
first and last loss, sampling tokens/s, and Bios's speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import bios
from bios import chat, types

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16
LEARNING_RATE = 2e-3
SYSTEM = "You are the archivist of the Quillmere Atlas. Answer in one complete sentence."
FACTS = [
    ("Who founded the city of Quillmere?", "Ada Vell founded Quillmere in 1832."),
    ("What is the capital of Norrath Vey?", "The capital of Norrath Vey is Saltmarrow."),
    ("What colour is a ripe zentrill fruit?", "A ripe zentrill fruit is violet."),
    ("Who invented the harmonic loom?", "Tobias Prenn invented the harmonic loom."),
]
SAMPLES, SAMPLE_TOKENS = 8, 64


@dataclass
class Run:
    """One framework's figures."""

    step_seconds: list[float]
    losses: list[float]
    tokens_per_second: float
    step_cost: tuple[float, float] | None = None
    """XLA's cost analysis of the compiled training step (FLOPs, bytes accessed), Bios only."""

    def line(self, name: str) -> str:
        rest = statistics.median(self.step_seconds[1:]) if len(self.step_seconds) > 1 else float("nan")
        return (
            f"{name:<16} first step {self.step_seconds[0]:6.2f} s   median {rest:6.3f} s/step   "
            f"loss {self.losses[0]:9.3f} → {self.losses[-1]:8.3f}   sampling {self.tokens_per_second:7.1f} tok/s"
        )


def conversation(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return messages + ([{"role": "assistant", "content": answer}] if answer else [])


def run_bios(data: list[types.Datum], prompt: list[int], steps: int) -> Run:
    """The job on Bios JAX, in process, through the public API."""
    service = bios.ServiceClient(backend="jax")
    training = service.create_lora_training_client(MODEL, rank=RANK, target_modules=list(MODULES))
    seconds, losses = [], []
    for _ in range(steps):
        started = time.perf_counter()
        losses.append(training.train(data, learning_rate=LEARNING_RATE).loss)
        seconds.append(time.perf_counter() - started)
    cost = step_cost(lambda: training.train(data, learning_rate=0.0))
    sampler = training.save_weights_and_get_sampling_client("side-by-side")
    params = types.SamplingParams(max_tokens=SAMPLE_TOKENS, temperature=1.0, seed=0)

    def sample() -> tuple[int, float]:
        started = time.perf_counter()
        result = sampler.sample(types.ModelInput.from_ints(prompt), params, num_samples=SAMPLES).result()
        return sum(len(s.tokens) for s in result.sequences), time.perf_counter() - started

    sample()  # compiles the prefill and decode programs
    tokens, elapsed = sample()
    return Run(seconds, losses, tokens / elapsed, cost)


def step_cost(step: Callable[[], object]) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of the fused training program (`train_update`: forward, backward
    and Adam update) that `step` runs, from XLA's cost analysis of the compiled program. XLA
    counts the body of the layer loop once, not per layer."""
    from backends.jax import compiled

    program = compiled.train_update
    calls: list[tuple[tuple, dict]] = []

    def recorded(*args: object, **kwargs: object) -> object:
        calls.append((args, kwargs))
        return program(*args, **kwargs)

    compiled.train_update = recorded  # type: ignore[assignment]
    try:
        step()
    finally:
        compiled.train_update = program
    args, kwargs = calls[-1]
    analysis = program.lower(*args, **kwargs).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"]), float(analysis["bytes accessed"])


def run_hf(data: list[types.Datum], prompt: list[int], steps: int, path: str) -> Run:
    """The job on transformers + PEFT (torch CPU, float32), the loss computed as Bios's."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(MODULES), lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    defaults = types.AdamParams()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=LEARNING_RATE,
        betas=(defaults.beta1, defaults.beta2),
        eps=defaults.eps,
        weight_decay=defaults.weight_decay,
    )
    width = max(d.model_input.length for d in data)
    tokens, targets, weights, mask = (np.zeros((len(data), width), dtype) for dtype in (int, int, np.float32, int))
    for i, datum in enumerate(data):
        n = datum.model_input.length
        tokens[i, :n], mask[i, :n] = datum.model_input.to_ints(), 1
        targets[i, :n] = datum.loss_fn_inputs["target_tokens"].to_numpy()
        weights[i, :n] = datum.loss_fn_inputs["weights"].to_numpy()
    x, y, w, m = (torch.from_numpy(a) for a in (tokens, targets, weights, mask))
    seconds, losses = [], []
    for _ in range(steps):
        started = time.perf_counter()
        logits = model(input_ids=x, attention_mask=m).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, y[..., None])[..., 0]
        loss = -(logprobs * w).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        seconds.append(time.perf_counter() - started)

    def generate() -> tuple[int, float]:
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt] * SAMPLES),
                attention_mask=torch.ones(SAMPLES, len(prompt), dtype=torch.long),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=SAMPLE_TOKENS,
                min_new_tokens=SAMPLE_TOKENS,
            )
        return (out.shape[1] - len(prompt)) * SAMPLES, time.perf_counter() - started

    generate()
    generated, elapsed = generate()
    return Run(seconds, losses, generated / elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    service = bios.ServiceClient(backend="emulator")
    spec = service.transport.catalog.get(MODEL)
    tokenizer = spec.tokenizer()
    data = [chat.conversation_datum(tokenizer, conversation(q, a)) for q, a in FACTS]
    prompt = chat.prompt_tokens(tokenizer, conversation(FACTS[0][0]))
    print(f"{MODEL}: {len(data)} chats, {sum(d.model_input.length for d in data)} tokens per step, float32")
    print(f"LoRA rank {RANK} alpha {2 * RANK} on {', '.join(MODULES)}; AdamW lr {LEARNING_RATE}; {args.steps} steps")
    print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.2f} at start")
    ours = run_bios(data, prompt, args.steps)
    theirs = run_hf(data, prompt, args.steps, str(spec.hf_path))
    print(ours.line("Bios JAX"))
    print(theirs.line("HF + PEFT torch"))
    ratio = statistics.median(theirs.step_seconds[1:]) / statistics.median(ours.step_seconds[1:])
    print(f"Bios speed-up: training {ratio:.2f}x, sampling {ours.tokens_per_second / theirs.tokens_per_second:.2f}x")
    if ours.step_cost is not None:
        flops, moved = ours.step_cost
        print(f"Bios training step program (XLA cost analysis): {flops / 1e9:.2f} GFLOP, {moved / 1e9:.2f} GB")
    print(f"first-step losses agree to {abs(ours.losses[0] - theirs.losses[0]) / abs(theirs.losses[0]):.1e} (relative)")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
