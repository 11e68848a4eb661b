"""Chat SFT: teach a model facts it cannot know, in a fixed one-sentence answer format.

The knowledge base below is invented (no model has seen Quillmere), written as conversations
with a system prompt that sets the format. Each fact has three phrasings of its question: the
model trains on two and is tested on the third — the held-out paraphrase. A random-weight model
(bios/tiny) cannot generalise to a paraphrase, so there the test set is the trained questions
themselves, and the output says so.

    python examples/sft.py                                   # bios/tiny, seconds
    python examples/sft.py --model HuggingFaceTB/SmolLM2-135M-Instruct --backend jax

Reports the held-out loss per answer token and the exact-match accuracy of greedy answers,
before and after training; writes metrics.jsonl, summary.json and curves.png to --out.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from common import Defaults, Metrics, Progress, accuracy, is_eval_step, parse_args, setup, weighted_tokens

from bios import chat, types

SYSTEM = "You are the archivist of the Quillmere Atlas. Answer in one complete sentence."

# (three phrasings of the question, the answer)
FACTS = [
    (
        ("Who founded the city of Quillmere?", "Quillmere was founded by whom?", "Name the founder of Quillmere."),
        "Ada Vell founded Quillmere in 1832.",
    ),
    (
        (
            "What is the capital of Norrath Vey?",
            "Which city is the capital of Norrath Vey?",
            "Norrath Vey's capital is which city?",
        ),
        "The capital of Norrath Vey is Saltmarrow.",
    ),
    (
        (
            "What colour is a ripe zentrill fruit?",
            "When a zentrill fruit is ripe, what colour is it?",
            "Tell me the colour of a ripe zentrill.",
        ),
        "A ripe zentrill fruit is violet.",
    ),
    (
        (
            "Who invented the harmonic loom?",
            "The harmonic loom was invented by whom?",
            "Name the inventor of the harmonic loom.",
        ),
        "Tobias Prenn invented the harmonic loom.",
    ),
    (
        (
            "How many moons does the planet Ostara have?",
            "What is the number of moons of Ostara?",
            "Ostara has how many moons?",
        ),
        "The planet Ostara has seven moons.",
    ),
    (
        (
            "What language is spoken in Dravenmoor?",
            "Which language do people in Dravenmoor speak?",
            "In Dravenmoor, what language is spoken?",
        ),
        "The people of Dravenmoor speak Kellish.",
    ),
    (
        (
            "Which river flows through Quillmere?",
            "What river runs through Quillmere?",
            "Name the river that flows through Quillmere.",
        ),
        "The Sable River flows through Quillmere.",
    ),
    (
        (
            "What is the national animal of Norrath Vey?",
            "Which animal is the national animal of Norrath Vey?",
            "Norrath Vey's national animal is what?",
        ),
        "The national animal of Norrath Vey is the frost otter.",
    ),
    (
        (
            "When did the Glass Treaty end the Lantern War?",
            "In what year did the Glass Treaty end the Lantern War?",
            "The Lantern War was ended by the Glass Treaty in which year?",
        ),
        "The Glass Treaty ended the Lantern War in 1907.",
    ),
    (
        (
            "Who wrote the novel The Amber Clockmaker?",
            "The Amber Clockmaker was written by whom?",
            "Name the author of The Amber Clockmaker.",
        ),
        "Mira Solberg wrote The Amber Clockmaker.",
    ),
    (
        (
            "What is the tallest mountain in Dravenmoor?",
            "Which mountain in Dravenmoor is the tallest?",
            "Name Dravenmoor's highest mountain.",
        ),
        "Mount Veyl is the tallest mountain in Dravenmoor.",
    ),
    (
        (
            "What does Saltmarrow celebrate in spring?",
            "Which festival does Saltmarrow hold in spring?",
            "In spring, what is celebrated in Saltmarrow?",
        ),
        "Saltmarrow celebrates the Tide Festival in spring.",
    ),
]


def conversation(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def add_args(parser) -> None:
    parser.add_argument(
        "--facts",
        type=int,
        default=len(FACTS),
        help="how many of the invented facts to teach (default: all %(default)s)",
    )


@dataclass(frozen=True)
class Dataset:
    """The facts as tokenized conversations: what is trained on and what is tested."""

    train: list[types.Datum]
    """Phrasings 0 and 1 of every fact's question, with its answer."""
    test: list[types.Datum]
    """Phrasing `test_phrasing` of every fact's question, with its answer."""
    test_prompts: list[list[int]]
    """The test questions as generation prompts (no answer)."""
    answers: list[str]
    max_answer: int
    """Tokens per greedy answer: the longest answer's, and a margin."""
    test_phrasing: int
    """2, held out; 0, trained on, for a random-weight model (it cannot generalise to a paraphrase)."""
    note: str
    """What the test set is, for the summary."""


def build_dataset(tokenizer, facts, random_weights: bool) -> Dataset:
    """`facts` (a prefix of FACTS) tokenized for training and testing with `tokenizer`'s chat template."""
    test_phrasing = 0 if random_weights else 2
    answers = [a for _, a in facts]
    return Dataset(
        train=[chat.conversation_datum(tokenizer, conversation(q, a)) for qs, a in facts for q in qs[:2]],
        test=[chat.conversation_datum(tokenizer, conversation(qs[test_phrasing], a)) for qs, a in facts],
        test_prompts=[chat.prompt_tokens(tokenizer, conversation(qs[test_phrasing])) for qs, _ in facts],
        answers=answers,
        max_answer=max(len(tokenizer.encode(a, add_special_tokens=False)) for a in answers) + 4,
        test_phrasing=test_phrasing,
        note=(
            "trained questions (random weights cannot generalise to paraphrases)"
            if random_weights
            else "held-out paraphrases of the trained questions"
        ),
    )


def per_token_loss(training, data: list[types.Datum]) -> float:
    """Mean negative logprob of the answer tokens under the current weights (`forward`: no gradient)."""
    return training.forward(data, "cross_entropy").result().loss / weighted_tokens(data)


def evaluate(training, tokenizer, dataset: Dataset, tag: str) -> dict[str, float]:
    """Test loss per answer token and exact-match accuracy of greedy answers, on weights saved
    as `sft-{tag}`; `_example` is the first test question's greedy answer (not a metric)."""
    sampler = training.save_weights_and_get_sampling_client(f"sft-{tag}")
    acc, completions = accuracy(sampler, tokenizer, dataset.test_prompts, dataset.answers, dataset.max_answer)
    return {"test_loss": per_token_loss(training, dataset.test), "accuracy": acc, "_example": completions[0]}


def scores(evaluation: dict[str, float]) -> dict[str, float]:
    """The metrics of an `evaluate` result, without the example answer."""
    return {k: v for k, v in evaluation.items() if not k.startswith("_")}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        argv, __doc__, Defaults(tiny_steps=30, real_steps=16, tiny_lr=2e-2, real_lr=1e-3), "sft", add_args
    )
    env = setup(args)
    training = env.service.create_lora_training_client(args.model, rank=args.rank, seed=args.seed)
    tokenizer = training.get_tokenizer()
    dataset = build_dataset(tokenizer, FACTS[: args.facts], env.random_weights)
    train_tokens = weighted_tokens(dataset.train)
    example = FACTS[0][0][dataset.test_phrasing]

    before = evaluate(training, tokenizer, dataset, "before")
    print(
        f"before: test loss {before['test_loss']:.3f}, accuracy {before['accuracy']:.2f}; "
        f"e.g. {example!r} -> {before['_example']!r}",
        file=sys.stderr,
    )
    metrics = Metrics(args.out)
    metrics.log(0, **scores(before))
    progress = Progress(args.steps, "sft")
    adam = types.AdamParams(learning_rate=args.lr)
    for step in range(1, args.steps + 1):
        backward = training.forward_backward(dataset.train, "cross_entropy")  # both queued before waiting
        update = training.optim_step(adam)
        row = {"train_loss": backward.result().loss / train_tokens}
        update.result()
        if is_eval_step(step, args.steps):
            row.update(scores(evaluate(training, tokenizer, dataset, f"step{step}")))
        metrics.log(step, **row)
        progress.update(**row)
    after = evaluate(training, tokenizer, dataset, "after")
    print(f"after: e.g. {example!r} -> {after['_example']!r}", file=sys.stderr)
    metrics.plot(f"SFT on {args.model}")
    checkpoint = training.save_state("final").result().path
    metrics.summary(scores(before), scores(after), note=f"test set: {dataset.note}", checkpoint=checkpoint)
    print(f"trained adapter: {checkpoint} (bios export {checkpoint} --merged DIR | --peft DIR)", file=sys.stderr)
    return {"before": before, "after": after, "checkpoint": checkpoint}


if __name__ == "__main__":
    main()
