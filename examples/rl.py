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


def sampling_params(args, tokenizer, random_weights: bool) -> types.SamplingParams:
    """How the policy samples its groups: temperature 1, and top-k per `--top-k` or the model."""
    # A random-weight model spreads its mass evenly over 4096 tokens, so no reward would ever
    # repeat; top-k sampling gives it a small action space in which rewards can be found.
    top_k = args.top_k if args.top_k is not None else (8 if random_weights else -1)
    return types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_k=top_k, stop=stop_tokens(tokenizer))


def fresh_problems(rng: random.Random, count: int, test_set: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`count` problems, none of them in the test set: all are redrawn together until so."""
    problems = [problem(rng) for _ in range(count)]
    while any((a, b) in test_set for a, b in problems):
        problems = [problem(rng) for _ in range(count)]
    return problems


def policy_datum(prompt: list[int], sequence, advantage: float) -> types.Datum:
    """One sampled completion as `importance_sampling` data: every completion token carries
    `advantage` and the sampler's logprob; the prompt's targets carry neither."""
    tokens = prompt + list(sequence.tokens)
    pad = len(prompt) - 1  # prompt targets: no advantage, so no gradient
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.asarray(tokens[1:], dtype=np.int64),
            "logprobs": np.asarray([0.0] * pad + list(sequence.logprobs), dtype=np.float32),
            "advantages": np.asarray([0.0] * pad + [advantage] * len(sequence.tokens), dtype=np.float32),
        },
    )


def group_data(tokenizer, prompt: list[int], answer: int, sequences) -> tuple[list[types.Datum], np.ndarray]:
    """(training data, rewards) of one problem's group: each completion's advantage is its reward
    minus the group's mean, over the group size; a group whose rewards are all equal gives no data."""
    rewards = np.array([reward(tokenizer.decode(s.tokens, skip_special_tokens=True), answer) for s in sequences])
    advantages = rewards - rewards.mean()
    if not advantages.any():
        return [], rewards
    return [policy_datum(prompt, s, advantage / len(sequences)) for s, advantage in zip(sequences, advantages)], rewards


def rollouts(
    sampler, tokenizer, problems: list[tuple[int, int]], params: types.SamplingParams, seed: int, group_size: int
) -> tuple[list[types.Datum], list[float]]:
    """(training data, every sampled reward): `group_size` completions of each problem, problem i
    sampled with seed `seed + i`; all groups are in flight at once."""
    prompts = [prompt_tokens(tokenizer, a, b) for a, b in problems]
    futures = [
        sampler.sample(types.ModelInput.from_ints(p), params.model_copy(update={"seed": seed + i}), group_size)
        for i, p in enumerate(prompts)
    ]
    data, rewards = [], []
    for prompt, (a, b), future in zip(prompts, problems, futures):
        group, group_rewards = group_data(tokenizer, prompt, a + b, future.result().sequences)
        data += group
        rewards.extend(group_rewards)
    return data, rewards


def evaluate(training, tokenizer, test_set: list[tuple[int, int]], max_tokens: int, tag: str) -> dict[str, float]:
    """Mean reward and accuracy of greedy answers to the test problems, on weights saved as `rl-{tag}`."""
    sampler = training.save_weights_and_get_sampling_client(f"rl-{tag}")
    completions = generate(sampler, tokenizer, [prompt_tokens(tokenizer, a, b) for a, b in test_set], max_tokens)
    rewards = [reward(c, a + b) for c, (a, b) in zip(completions, test_set)]
    return {
        "greedy_reward": float(np.mean(rewards)),
        "greedy_accuracy": float(np.mean([r == 1.0 for r in rewards])),
    }


def reward_trend(rows: list[dict[str, float]]) -> tuple[int, float, float]:
    """(k, mean sampled reward over the first k iterations, over the last k): k is a quarter of
    the iterations logged in `rows`, at least one."""
    rewards = [r["mean_reward"] for r in rows if "mean_reward" in r]
    k = max(len(rewards) // 4, 1)
    return k, float(np.mean(rewards[:k])), float(np.mean(rewards[-k:]))


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv, __doc__, Defaults(tiny_steps=12, real_steps=10, tiny_lr=2e-2, real_lr=1e-3), "rl", add_args)
    env = setup(args)
    n_prompts = args.prompts or (4 if env.random_weights else 8)
    training = env.service.create_lora_training_client(args.model, rank=args.rank, seed=args.seed)
    tokenizer = training.get_tokenizer()
    rng = random.Random(args.seed)
    test_set = sorted({problem(random.Random(10_000 + i)) for i in range(32)})

    before = evaluate(training, tokenizer, test_set, args.max_tokens, "before")
    metrics = Metrics(args.out)
    metrics.log(0, **before)
    progress = Progress(args.steps, "rl")
    adam = types.AdamParams(learning_rate=args.lr)
    params = sampling_params(args, tokenizer, env.random_weights)
    for it in range(1, args.steps + 1):
        sampler = training.save_weights_and_get_sampling_client(f"rl-{it}")
        problems = fresh_problems(rng, n_prompts, test_set)
        data, rewards = rollouts(sampler, tokenizer, problems, params, args.seed * 100_000 + it * 100, args.group_size)
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
    after = evaluate(training, tokenizer, test_set, args.max_tokens, "after")
    metrics.log(args.steps, **after)
    k, first, last = reward_trend(metrics.rows)
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
