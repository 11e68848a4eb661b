"""What the recipes share: command-line arguments, the held-out split and evaluation schedule, a
progress line, metrics on disk, evaluation.

Public API only (`bios`, `bios.types`, `bios.chat`). Every recipe takes the same arguments:

    --model      base model (default bios/tiny, the built-in random-weight model)
    --backend    emulator | jax (default: BIOS_BACKEND, else jax when installed, else emulator)
    --base-url   a remote `bios serve` instead of running in this process
    --steps      training steps / iterations (default: sized for the model; small on bios/tiny)
    --lr         Adam learning rate (default: sized for the model)
    --rank       LoRA rank
    --seed       seeds the adapter, the data order and the sampler
    --out        directory for metrics.jsonl, summary.json and curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import bios
from bios import types

T = TypeVar("T")


@dataclass(frozen=True)
class Defaults:
    """A recipe's step count and learning rate on the random tiny model and on a real one."""

    tiny_steps: int
    real_steps: int
    tiny_lr: float
    real_lr: float


def parse_args(
    argv: Sequence[str] | None,
    description: str,
    defaults: Defaults,
    name: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The common arguments (plus the recipe's own, added by `extra`); `steps`/`lr` stay None
    when not given, to be sized by `setup` once the model is known."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bios/tiny", help="base model (default: %(default)s)")
    parser.add_argument(
        "--backend", default=None, help="emulator or jax (default: BIOS_BACKEND, else jax if installed)"
    )
    parser.add_argument("--base-url", default=None, help="URL of a remote `bios serve` (default: run in-process)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default: {defaults.tiny_steps} on a random-weight model, "
        f"{defaults.real_steps} on a real one)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"learning rate (default: {defaults.tiny_lr:g} on a random-weight model, "
        f"{defaults.real_lr:g} on a real one)",
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join("runs", name), help="output directory (default: %(default)s)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.defaults = defaults
    return args


@dataclass
class Setup:
    service: bios.ServiceClient
    model: types.ModelInfo
    random_weights: bool
    """True for a random-initialised model (bios/tiny): it knows nothing, so held-out sets that
    need generalisation or prior knowledge are replaced by the training set, and said so."""


def setup(args: argparse.Namespace) -> Setup:
    """Connect, look the model up, fill in `args.steps`/`args.lr` and create `args.out`."""
    service = bios.ServiceClient(base_url=args.base_url, backend=args.backend)
    models = {m.model_name: m for m in service.get_server_capabilities().supported_models}
    if args.model not in models:
        raise SystemExit(
            f"--model {args.model!r} is not served here; available: {', '.join(sorted(models))}"
            " (fetch real models with `make models`)"
        )
    info = models[args.model]
    d = args.defaults
    if args.steps is None:
        args.steps = d.tiny_steps if info.random_init else d.real_steps
    if args.lr is None:
        args.lr = d.tiny_lr if info.random_init else d.real_lr
    os.makedirs(args.out, exist_ok=True)
    print(
        f"{args.model} ({'random weights' if info.random_init else 'pretrained'}, {info.n_params / 1e6:.1f} M params) "
        f"on {service.get_server_capabilities().backend or 'remote'}: "
        f"{args.steps} steps, lr {args.lr:g}, rank {args.rank}",
        file=sys.stderr,
    )
    return Setup(service, info, info.random_init)


def split_held_out(
    items: Sequence[T], held_out: int, random_weights: bool, noun: str
) -> tuple[Sequence[T], Sequence[T], str]:
    """(training items, evaluation items, a note saying which): the last `held_out` items are held
    out, except on a random-weight model, which cannot generalise and is evaluated on its training
    items instead. `noun` names the items in the note ("pairs", "questions")."""
    train = items[:-held_out]
    if random_weights:
        return train, train, f"evaluated on the training {noun} (random weights cannot generalise)"
    return train, items[-held_out:], f"evaluated on {held_out} held-out {noun}"


def is_eval_step(step: int, steps: int) -> bool:
    """True on every fifth of a run of `steps` (1-based `step`) and on its last step."""
    return step % max(steps // 5, 1) == 0 or step == steps


class Progress:
    """A one-line progress bar on stderr: `label [#####.....] 5/10 loss 1.23 (4.1s)`."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.count, self.start = total, label, 0, time.monotonic()

    def update(self, **values: float) -> None:
        self.count += 1
        filled = int(20 * self.count / max(self.total, 1))
        shown = "  ".join(f"{k} {v:.3g}" for k, v in values.items())
        elapsed = time.monotonic() - self.start
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (20 - filled)}] "
            f"{self.count}/{self.total}  {shown} ({elapsed:.1f}s)\033[K"
        )
        sys.stderr.flush()
        if self.count >= self.total:
            sys.stderr.write("\n")


class Metrics:
    """Writes one JSON object per `log` call to OUT/metrics.jsonl; `summary` writes
    OUT/summary.json and prints the "before → after" line; `plot` draws OUT/curves.png."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.rows: list[dict[str, float]] = []
        self.path = os.path.join(out, "metrics.jsonl")
        open(self.path, "w").close()

    def log(self, step: int, **values: float) -> None:
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def summary(self, before: dict[str, float], after: dict[str, float], note: str = "", **extra: object) -> None:
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump({"before": before, "after": after, "note": note, **extra}, f, indent=2)
        changes = ", ".join(f"{k} {before[k]:.3f} → {after[k]:.3f}" for k in before)
        print(f"before → after: {changes}" + (f"  ({note})" if note else ""))

    def plot(self, title: str) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed (pip install 'bios[examples]'): no curves.png", file=sys.stderr)
            return
        keys = [k for k in dict.fromkeys(k for row in self.rows for k in row) if k != "step"]
        if not keys:
            return
        fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.2 * len(keys)), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            points = [(r["step"], r[key]) for r in self.rows if key in r and math.isfinite(r[key])]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(os.path.join(self.out, "curves.png"), dpi=100)
        plt.close(fig)


def stop_tokens(tokenizer: bios.Tokenizer) -> list[int]:
    """End-of-turn stop: the tokenizer's EOS (ChatML's <|im_end|> for the built-in and SmolLM2)."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def weighted_tokens(data: Sequence[types.Datum]) -> float:
    """The total `weights` of `data` (every datum must carry them): the answer tokens a summed
    cross-entropy loss is divided by to give a loss per token."""
    return sum(float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in data)


def generate(
    sampler: bios.SamplingClient,
    tokenizer: bios.Tokenizer,
    prompts: Sequence[list[int]],
    max_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[str]:
    """One completion per prompt (greedy by default), decoded without special tokens and stripped.

    All prompts' `sample` futures are submitted before any is waited on, so the service can
    batch them."""
    params = types.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop_tokens(tokenizer)
    )
    futures = [sampler.sample(types.ModelInput.from_ints(p), params) for p in prompts]
    return [tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True).strip() for f in futures]


def accuracy(
    sampler: bios.SamplingClient,
    tokenizer: bios.Tokenizer,
    prompts: Sequence[list[int]],
    answers: Sequence[str],
    max_tokens: int,
) -> tuple[float, list[str]]:
    """(fraction of greedy completions equal to their answer after strip, the completions)."""
    completions = generate(sampler, tokenizer, prompts, max_tokens)
    hits = sum(c == a.strip() for c, a in zip(completions, answers, strict=True))
    return hits / max(len(answers), 1), completions
