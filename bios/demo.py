"""`bios demo`: teach a LoRA on the built-in model to reverse the words of a sentence.

A reader sees the task being learnt: greedy answers before training are noise, the loss per
step falls, and afterwards the answers are the reversed sentences. Ends by saving a
checkpoint and printing its path.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from bios.errors import InvalidRequestError
from bios.service_client import ServiceClient
from bios.tokenizer import Tokenizer
from bios.types import Datum, ModelInput, SamplingParams

WORDS = ("cat", "dog", "sun", "red", "big", "run", "sky", "tree", "blue", "fish", "bird", "book")
DEFAULT_STEPS = 300
BATCH = 32
LEARNING_RATE = 3e-3


def sentence(rng: np.random.Generator) -> list[str]:
    """Three distinct words, so the reversal is never the identity."""
    return [str(w) for w in rng.choice(WORDS, size=3, replace=False)]


def prompt_text(words: list[str]) -> str:
    return f"reverse: {' '.join(words)} =>"


def answer_text(words: list[str]) -> str:
    return " " + " ".join(reversed(words))


def supervised_datum(tokenizer: Tokenizer, prompt: str, answer: str) -> Datum:
    """Next-token datum over prompt + answer + end token, with loss weights on the answer only."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidRequestError(f"tokenizer {tokenizer.name_or_path}: the demo needs an eos_token", field="eos_token")
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [eos]
    tokens = prompt_ids + answer_ids
    weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(answer_ids)
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def _progress(step: int, total: int, loss: float, started: float) -> None:
    filled = int(30 * step / total)
    bar = "#" * filled + "." * (30 - filled)
    sys.stdout.write(f"\r  [{bar}] step {step:3d}/{total}  loss {loss:7.4f}  {time.monotonic() - started:5.1f}s")
    sys.stdout.flush()
    if step % 25 == 0 or step == total:
        sys.stdout.write("\n")


def run_demo(backend: str | None = None, model: str = "bios/tiny", steps: int | None = None, seed: int = 0) -> float:
    """Run the demo and return the held-out exact-match accuracy after training (0..1)."""
    steps = DEFAULT_STEPS if steps is None else steps
    service = ServiceClient(backend=backend)
    training = service.create_lora_training_client(base_model=model, rank=16, seed=seed)
    tokenizer = training.get_tokenizer()
    rng = np.random.default_rng(seed)
    held_out = [sentence(np.random.default_rng(10_000 + i)) for i in range(24)]
    print(f"Bios demo: teaching {model} (backend {service.config.backend}) to reverse three-word sentences")

    def evaluate(label: str) -> float:
        greedy = SamplingParams(max_tokens=8, temperature=0.0, stop=[tokenizer.eos_token_id])
        sampler = training.save_weights_and_get_sampling_client(f"demo-{label.split()[0]}")
        futures = [sampler.sample(ModelInput.from_ints(tokenizer.encode(prompt_text(w))), greedy) for w in held_out]
        answers = [tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True) for f in futures]
        correct = [a == answer_text(w) for a, w in zip(answers, held_out)]
        print(f"{label}: {sum(correct)}/{len(correct)} held-out sentences reversed exactly")
        for words, answer in list(zip(held_out, answers))[:3]:
            print(f"    {prompt_text(words)}{answer!r:28s} (want {answer_text(words)!r})")
        return sum(correct) / len(correct)

    evaluate("before training")
    started = time.monotonic()
    for step in range(1, steps + 1):
        batch = [
            supervised_datum(tokenizer, prompt_text(w), answer_text(w)) for w in (sentence(rng) for _ in range(BATCH))
        ]
        result = training.train(batch, loss_fn="cross_entropy", learning_rate=LEARNING_RATE)
        _progress(step, steps, result.loss / BATCH, started)
    accuracy = evaluate("after training")
    checkpoint = training.save_state(
        "demo-final", metadata={"task": "reverse-words", "steps": steps, "accuracy": accuracy}
    ).result()
    print(f"checkpoint saved: {checkpoint.path}")
    return accuracy
