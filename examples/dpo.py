"""DPO from preference pairs, as a custom loss through `forward_backward_custom`.

Each pair is a question with a preferred (correct, complete) and a rejected (wrong) answer.
The reference logprobs come once, before training, from the frozen base model through a
`SamplingClient`'s `compute_logprobs`; the DPO loss

    loss = -mean log σ(β · ((π_c - ref_c) - (π_r - ref_r)))

(π, ref: summed logprobs of the answer tokens under the policy and the reference) is written in
jax.numpy and its exact gradient goes back through the service (docs/losses.md, L7). Reports
preference accuracy (how often the implied reward prefers the chosen answer) and the mean
reward margin β·(...), before and after. Pairs 13-20 are held out; on a random-weight model
(bios/tiny), which cannot generalise, the evaluation uses the training pairs and says so.

    python examples/dpo.py                                   # bios/tiny, seconds
    python examples/dpo.py --model HuggingFaceTB/SmolLM2-135M-Instruct --backend jax
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from common import Defaults, Metrics, Progress, is_eval_step, parse_args, setup, split_held_out

from bios import chat, types

# (question, chosen, rejected)
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Lyon."),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide.", "Plants absorb helium."),
    ("What is the largest ocean on Earth?", "The Pacific is the largest ocean.", "The Arctic is the largest ocean."),
    (
        "At what temperature does water boil at sea level?",
        "Water boils at 100 degrees Celsius.",
        "Water boils at 60 degrees Celsius.",
    ),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote it.", "Charles Dickens wrote it."),
    ("What is the chemical symbol for gold?", "The symbol for gold is Au.", "The symbol for gold is Gd."),
    ("How many days are in a leap year?", "A leap year has 366 days.", "A leap year has 365 days."),
    ("Which planet is known as the Red Planet?", "Mars is the Red Planet.", "Venus is the Red Planet."),
    ("What is the square root of 81?", "The square root of 81 is 9.", "The square root of 81 is 8."),
    (
        "What is the fastest land animal?",
        "The cheetah is the fastest land animal.",
        "The horse is the fastest land animal.",
    ),
    ("How many continents are there?", "There are seven continents.", "There are five continents."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "The capital of Japan is Osaka."),
    ("How many sides does a hexagon have?", "A hexagon has six sides.", "A hexagon has eight sides."),
    ("What do bees make?", "Bees make honey.", "Bees make milk."),
    ("What is frozen water called?", "Frozen water is called ice.", "Frozen water is called steam."),
    ("How many hours are in a day?", "A day has 24 hours.", "A day has 20 hours."),
    ("What colour is a ripe banana?", "A ripe banana is yellow.", "A ripe banana is blue."),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "The opposite of hot is loud."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels.", "A bicycle has four wheels."),
]
HELD_OUT = 8


def pair_data(tokenizer, pairs) -> list[types.Datum]:
    """[chosen_0, rejected_0, chosen_1, rejected_1, ...] as supervised data (answer tokens weighted)."""
    data = []
    for question, chosen, rejected in pairs:
        for answer in (chosen, rejected):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            data.append(chat.conversation_datum(tokenizer, messages))
    return data


def reference_sums(sampler, data: list[types.Datum]) -> np.ndarray:
    """[2P] summed answer-token logprobs of each datum under the frozen base (all requests in flight at once)."""
    futures = [
        sampler.compute_logprobs(
            types.ModelInput.from_ints(
                d.model_input.to_ints() + [int(d.loss_fn_inputs["target_tokens"].to_numpy()[-1])]
            )
        )
        for d in data
    ]
    sums = []
    for d, future in zip(data, futures):
        lp = np.asarray(future.result()[1:], dtype=np.float64)  # position 0 has no logprob
        sums.append(float((lp * d.loss_fn_inputs["weights"].to_numpy()).sum()))
    return np.asarray(sums)


def dpo_loss_fn(data: list[types.Datum], reference: np.ndarray, beta: float):
    """The custom loss `fn(data, logprobs) -> (loss, metrics)` for `forward_backward_custom`."""
    weights = [jnp.asarray(d.loss_fn_inputs["weights"].to_numpy()) for d in data]
    ref = jnp.asarray(reference)

    def loss_fn(_data, logprobs):
        policy = jnp.stack([jnp.sum(lp * w) for lp, w in zip(logprobs, weights)])  # [2P]
        margin = beta * ((policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2]))  # [P]
        loss = -jnp.mean(jax.nn.log_sigmoid(margin))
        return loss, {"preference_accuracy": jnp.mean(margin > 0), "reward_margin": jnp.mean(margin)}

    return loss_fn


def evaluate(training, data: list[types.Datum], reference: np.ndarray, beta: float) -> dict[str, float]:
    """Preference accuracy, mean reward margin and how often the policy prefers the chosen answer,
    over `data` (pairs as `pair_data` lays them out) with `reference` its `reference_sums`."""
    outputs = training.forward(data, "cross_entropy").result().loss_fn_outputs  # no gradient
    policy = np.array(
        [(o["logprobs"].to_numpy() * d.loss_fn_inputs["weights"].to_numpy()).sum() for o, d in zip(outputs, data)]
    )
    margin = beta * ((policy[0::2] - reference[0::2]) - (policy[1::2] - reference[1::2]))
    # The policy's own preference (chosen likelier than rejected) shows what a user would see.
    ties = np.abs(margin) < 1e-4  # a tie (the policy is the reference, up to rounding) counts half
    return {
        "preference_accuracy": float(np.mean(np.where(ties, 0.5, margin > 0))),
        "reward_margin": float(np.mean(margin)),
        "prefers_chosen": float(np.mean(policy[0::2] > policy[1::2])),
    }


def prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    """`values` with `prefix` before each name, in the same order."""
    return {f"{prefix}{k}": v for k, v in values.items()}


def add_args(parser) -> None:
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature β (default: %(default)s)")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        argv, __doc__, Defaults(tiny_steps=20, real_steps=12, tiny_lr=1e-2, real_lr=5e-4), "dpo", add_args
    )
    env = setup(args)
    training = env.service.create_lora_training_client(args.model, rank=args.rank, seed=args.seed)
    tokenizer = training.get_tokenizer()
    train_pairs, eval_pairs, note = split_held_out(PAIRS, HELD_OUT, env.random_weights, "pairs")
    train_data, eval_data = pair_data(tokenizer, train_pairs), pair_data(tokenizer, eval_pairs)
    base = env.service.create_sampling_client(base_model=args.model)  # the frozen reference
    train_ref, eval_ref = reference_sums(base, train_data), reference_sums(base, eval_data)
    loss_fn = dpo_loss_fn(train_data, train_ref, args.beta)

    before = evaluate(training, eval_data, eval_ref, args.beta)
    metrics = Metrics(args.out)
    metrics.log(0, **prefixed("eval_", before))
    progress = Progress(args.steps, "dpo")
    adam = types.AdamParams(learning_rate=args.lr)
    for step in range(1, args.steps + 1):
        backward = training.forward_backward_custom(train_data, loss_fn)
        update = training.optim_step(adam)
        result = backward.result()
        update.result()
        row = {
            "loss": result.loss,
            "train_preference_accuracy": result.metrics["preference_accuracy"],
            "train_reward_margin": result.metrics["reward_margin"],
        }
        if is_eval_step(step, args.steps):
            row.update(prefixed("eval_", evaluate(training, eval_data, eval_ref, args.beta)))
        metrics.log(step, **row)
        progress.update(loss=row["loss"], margin=row["train_reward_margin"])
    after = evaluate(training, eval_data, eval_ref, args.beta)
    metrics.plot(f"DPO on {args.model}")
    # Before training the policy is the reference, so every margin is a tie (accuracy 0.5);
    # prefers_chosen shows the base model's own preference.
    metrics.summary(before, after, note=note)
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
