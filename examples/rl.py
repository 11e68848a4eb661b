"""GRPO-style RL on addition, with a checker as the reward.

Each problem asks "What is a + b?" and starts the assistant's reply with "a + b =" (a response
prefix), so the model's completion is the sum. Each iteration: snapshot the weights for sampling
(`save_weights_and_get_sampling_client`), sample `--group-size` completions for each of
`--prompts` fresh problems, score them with the checker, centre the rewards within each
problem's group (the advantage is the reward minus its group's mean; groups whose completions
all score the same teach nothing and are dropped), and take one `importance_sampling` step with
the sampler's logprobs as `logprobs`.

Reward: 1.0 for the right sum at the start of the completion, 0.2 for a wrong number there
(the format), 0 otherwise. Operands are drawn from 10-30, where SmolLM2-135M-Instruct is right
about a quarter of the time at temperature 1: enough right answers in most groups to learn from.
A random-weight model (bios/tiny) never adds correctly; on it the rising reward is the format
being learned, and it samples with top-k 8 (its next-token distribution is nearly uniform, so
without it no reward repeats).

    python examples/rl.py                                    # bios/tiny, seconds
    python examples/rl.py --model HuggingFaceTB/SmolLM2-135M-Instruct --backend jax
"""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Sequence

import numpy as np
from common import Defaults, Metrics, Progress, generate, parse_args, setup, stop_tokens

from bios import chat, types

LEADING_NUMBER = re.compile(r"\s*(-?\d+)")


def problem(rng: random.Random) -> tuple[int, int]:
    return rng.randint(10, 30), rng.randint(10, 30)


def prompt_tokens(tokenizer, a: int, b: int) -> list[int]:
    """The question in the chat template, then the start of the assistant's reply."""
    question = chat.prompt_tokens(tokenizer, [{"role": "user", "content": f"What is {a} + {b}?"}])
    return question + tokenizer.encode(f"{a} + {b} =", add_special_tokens=False)


def reward(completion: str, answer: int) -> float:
    """1.0 if the completion starts with `answer`, 0.2 if it starts with another number, else 0."""
    match = LEADING_NUMBER.match(completion)
    if match is None:
        return 0.0
    return 1.0 if int(match.group(1)) == answer else 0.2


def add_args(parser) -> None:
    parser.add_argument(
        "--prompts", type=int, default=None, help="problems per iteration (default: 4 on bios/tiny, 8 otherwise)"
    )
    parser.add_argument("--group-size", type=int, default=8, help="completions per problem (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per completion (default: %(default)s)")
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="sample from the k likeliest tokens only (default: 8 on a random-weight model, off otherwise)",
    )


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv, __doc__, Defaults(tiny_steps=12, real_steps=10, tiny_lr=2e-2, real_lr=1e-3), "rl", add_args)
    env = setup(args)
    n_prompts = args.prompts or (4 if env.random_weights else 8)
    training = env.service.create_lora_training_client(args.model, rank=args.rank, seed=args.seed)
    tokenizer = training.get_tokenizer()
    rng = random.Random(args.seed)
    test_set = sorted({problem(random.Random(10_000 + i)) for i in range(32)})
    test_prompts = [prompt_tokens(tokenizer, a, b) for a, b in test_set]

    def evaluate(tag: str) -> dict[str, float]:
        sampler = training.save_weights_and_get_sampling_client(f"rl-{tag}")
        completions = generate(sampler, tokenizer, test_prompts, args.max_tokens)
        rewards = [reward(c, a + b) for c, (a, b) in zip(completions, test_set)]
        return {
            "greedy_reward": float(np.mean(rewards)),
            "greedy_accuracy": float(np.mean([r == 1.0 for r in rewards])),
        }

    before = evaluate("before")
    metrics = Metrics(args.out)
    metrics.log(0, **before)
    progress = Progress(args.steps, "rl")
    adam = types.AdamParams(learning_rate=args.lr)
    # A random-weight model spreads its mass evenly over 4096 tokens, so no reward would ever
    # repeat; top-k sampling gives it a small action space in which rewards can be found.
    top_k = args.top_k if args.top_k is not None else (8 if env.random_weights else -1)
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_k=top_k, stop=stop_tokens(tokenizer))
    for it in range(1, args.steps + 1):
        sampler = training.save_weights_and_get_sampling_client(f"rl-{it}")
        problems = [problem(rng) for _ in range(n_prompts)]
        while any((a, b) in test_set for a, b in problems):
            problems = [problem(rng) for _ in range(n_prompts)]
        prompts = [prompt_tokens(tokenizer, a, b) for a, b in problems]
        futures = [
            sampler.sample(
                types.ModelInput.from_ints(p),
                params.model_copy(update={"seed": args.seed * 100_000 + it * 100 + i}),
                args.group_size,
            )
            for i, p in enumerate(prompts)
        ]  # all groups in flight at once
        data, rewards = [], []
        for prompt, (a, b), future in zip(prompts, problems, futures):
            sequences = future.result().sequences
            group = np.array([reward(tokenizer.decode(s.tokens, skip_special_tokens=True), a + b) for s in sequences])
            rewards.extend(group)
            advantages = group - group.mean()
            if not advantages.any():
                continue
            for seq, advantage in zip(sequences, advantages):
                tokens = prompt + list(seq.tokens)
                pad = len(prompt) - 1  # prompt targets: no advantage, so no gradient
                data.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={
                            "target_tokens": np.asarray(tokens[1:], dtype=np.int64),
                            "logprobs": np.asarray([0.0] * pad + list(seq.logprobs), dtype=np.float32),
                            "advantages": np.asarray(
                                [0.0] * pad + [advantage / len(sequences)] * len(seq.tokens), dtype=np.float32
                            ),
                        },
                    )
                )
        row = {
            "mean_reward": float(np.mean(rewards)),
            "accuracy": float(np.mean(np.array(rewards) == 1.0)),
            "trained_groups": len(data) / args.group_size,
        }
        if data:
            backward = training.forward_backward(data, "importance_sampling")
            update = training.optim_step(adam)
            row["loss"] = backward.result().loss
            update.result()
        metrics.log(it, **row)
        progress.update(reward=row["mean_reward"], acc=row["accuracy"])
    after = evaluate("after")
    metrics.log(args.steps, **after)
    rows = [r for r in metrics.rows if "mean_reward" in r]
    k = max(len(rows) // 4, 1)
    first, last = (
        float(np.mean([r["mean_reward"] for r in rows[:k]])),
        float(np.mean([r["mean_reward"] for r in rows[-k:]])),
    )
    print(f"sampled mean reward: first {k} iterations {first:.3f} → last {k} {last:.3f}", file=sys.stderr)
    metrics.plot(f"GRPO-style RL (addition) on {args.model}")
    metrics.summary(
        {"sampled_reward": first, **before},
        {"sampled_reward": last, **after},
        note=f"greedy figures on {len(test_set)} held-out problems; sampled reward over the first/last {k} iterations",
    )
    return {"before": before, "after": after, "first": first, "last": last}


if __name__ == "__main__":
    main()
