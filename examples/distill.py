"""Context distillation: bake a system prompt's instruction into a LoRA.

The teacher is the frozen base model given a system prompt whose instruction can be checked;
the student is a LoRA on the same base that never sees that prompt. The teacher answers each
training question `--samples` times; the answers that follow the instruction (a checker
filters) become the student's SFT data (plain `cross_entropy` on the assistant tokens,
questions without the system prompt). Reports how often the student's greedy answers follow
the instruction without the prompt, before and after, next to the teacher's own rate with it.

Two instructions (`--instruction`): "french" (a French system prompt: always answer in French;
checked by counting French and English function words) for a pretrained chat model, and
"three-words" (answer in exactly three words) for a random-weight model, whose random tokens
pass that checker now and then but never speak French. Questions 17-24 are held out; on a
random-weight model (bios/tiny), which cannot generalise, the evaluation uses the training
questions and says so.

    python examples/distill.py                               # bios/tiny, seconds
    python examples/distill.py --model HuggingFaceTB/SmolLM2-135M-Instruct --backend jax
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common import (
    Defaults,
    Metrics,
    Progress,
    generate,
    is_eval_step,
    parse_args,
    setup,
    split_held_out,
    stop_tokens,
    weighted_tokens,
)

from bios import chat, types

FRENCH_WORDS = frozenset(
    [
        "le",
        "la",
        "les",
        "un",
        "une",
        "des",
        "du",
        "de",
        "et",
        "est",
        "sont",
        "que",
        "qui",
        "pour",
        "pas",
        "avec",
        "dans",
        "sur",
        "vous",
        "je",
        "il",
        "elle",
        "nous",
        "ce",
        "cette",
        "au",
        "aux",
        "en",
    ]
)
ENGLISH_WORDS = frozenset(
    [
        "the",
        "a",
        "an",
        "is",
        "are",
        "and",
        "of",
        "to",
        "in",
        "for",
        "that",
        "with",
        "it",
        "you",
        "this",
        "be",
        "on",
        "as",
        "by",
    ]
)


def in_french(text: str) -> bool:
    """At least two French function words, and more of them than English ones."""
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())
    french, english = sum(w in FRENCH_WORDS for w in words), sum(w in ENGLISH_WORDS for w in words)
    return french >= 2 and french > english


def in_three_words(text: str) -> bool:
    """Exactly three whitespace-separated words."""
    return len(text.split()) == 3


@dataclass(frozen=True)
class Instruction:
    system: str
    follows: Callable[[str], bool]


INSTRUCTIONS = {
    "french": Instruction(
        "Tu es un assistant francophone. Réponds toujours en français, jamais en anglais, "
        "quelle que soit la langue de la question.",
        in_french,
    ),
    "three-words": Instruction(
        "You are a terse assistant for a wall display that has room for three words only. "
        "Whatever the user asks, answer in exactly three words: no more, no fewer.",
        in_three_words,
    ),
}

QUESTIONS = [
    "What is the capital of France?",
    "How do I make tea?",
    "Why is the sky blue?",
    "What should I eat for breakfast?",
    "How can I sleep better?",
    "What is your favourite colour?",
    "How do plants grow?",
    "Why do cats purr?",
    "What is the best way to learn a language?",
    "How far away is the Moon?",
    "What makes a good friend?",
    "How do I stay focused?",
    "What is music?",
    "Why do we dream?",
    "How do airplanes fly?",
    "What is the weather like in spring?",
    "How do I bake bread?",
    "What is the ocean made of?",
    "Why do leaves change colour?",
    "How can I save money?",
    "What is a computer?",
    "How do birds migrate?",
    "What is happiness?",
    "How do I start running?",
]
HELD_OUT = 8


def add_args(parser) -> None:
    parser.add_argument(
        "--instruction",
        choices=sorted(INSTRUCTIONS),
        default=None,
        help="the system prompt to distil (default: three-words on a random-weight model, french otherwise)",
    )
    parser.add_argument("--samples", type=int, default=8, help="teacher samples per question (default: %(default)s)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="teacher sampling temperature (default: 1.0 on a random-weight model, 0.7 otherwise)",
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=None,
        help="passing teacher answers kept per question (default: 1 on a random-weight model, 2 otherwise)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="tokens per answer (default: 6 on bios/tiny, 24 otherwise)"
    )


@dataclass(frozen=True)
class Settings:
    """The distillation's settings: the recipe's own flags, defaults filled in for the model."""

    instruction: Instruction
    max_tokens: int
    keep: int
    temperature: float
    samples: int
    seed: int


def settings(args, random_weights: bool) -> Settings:
    """The settings `args` ask for, each flag left unset defaulted for a random-weight or a real model."""
    # Random weights never stop on their own: short answers give the checker a chance to pass.
    max_tokens = args.max_tokens or (6 if random_weights else 24)
    # One target per question is memorisable for random weights; a real model gains from variety,
    # and every kept answer is in every step's batch (on a CPU, a few per question keep steps short).
    keep = args.keep or (1 if random_weights else 2)
    # A small real model strays at temperature 1; a cooler teacher follows its prompt more often.
    temperature = args.temperature if args.temperature is not None else (1.0 if random_weights else 0.7)
    instruction = INSTRUCTIONS[args.instruction or ("three-words" if random_weights else "french")]
    return Settings(instruction, max_tokens, keep, temperature, args.samples, args.seed)


def follow_rate(instruction: Instruction, texts: list[str]) -> float:
    """The fraction of `texts` that follow `instruction`."""
    return sum(map(instruction.follows, texts)) / max(len(texts), 1)


def user(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def with_system(instruction: Instruction, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": instruction.system}, *user(question)]


def teacher_data(teacher, tokenizer, questions: Sequence[str], config: Settings) -> list[types.Datum]:
    """The student's SFT data: for each question, the first `keep` of the teacher's `samples`
    answers (with the system prompt) that follow the instruction, as a conversation without it.

    Prints how many samples passed; raises SystemExit when none did."""
    params = types.SamplingParams(
        max_tokens=config.max_tokens, temperature=config.temperature, seed=config.seed, stop=stop_tokens(tokenizer)
    )
    futures = [
        teacher.sample(
            types.ModelInput.from_ints(chat.prompt_tokens(tokenizer, with_system(config.instruction, q))),
            params,
            config.samples,
        )
        for q in questions
    ]
    data, passed, sampled, covered = [], 0, 0, 0
    for q, future in zip(questions, futures):
        answers = [tokenizer.decode(seq.tokens, skip_special_tokens=True).strip() for seq in future.result().sequences]
        good = [a for a in answers if config.instruction.follows(a)]
        sampled, passed, covered = sampled + len(answers), passed + len(good), covered + bool(good)
        data += [
            chat.conversation_datum(tokenizer, user(q) + [{"role": "assistant", "content": a}])
            for a in good[: config.keep]
        ]
    print(
        f"teacher: {passed}/{sampled} samples follow the instruction, covering {covered}/{len(questions)} questions; "
        f"training on {len(data)}",
        file=sys.stderr,
    )
    if not data:
        raise SystemExit("no teacher sample follows the instruction; raise --samples")
    return data


def evaluate(training, tokenizer, questions: Sequence[str], config: Settings, tag: str) -> tuple[float, list[str]]:
    """(follow rate, the answers) of the student's greedy answers to `questions` without the
    system prompt, on weights saved as `distill-{tag}`."""
    sampler = training.save_weights_and_get_sampling_client(f"distill-{tag}")
    prompts = [chat.prompt_tokens(tokenizer, user(q)) for q in questions]
    answers = generate(sampler, tokenizer, prompts, config.max_tokens)
    return follow_rate(config.instruction, answers), answers


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        argv, __doc__, Defaults(tiny_steps=20, real_steps=8, tiny_lr=2e-2, real_lr=1e-3), "distill", add_args
    )
    env = setup(args)
    config = settings(args, env.random_weights)
    training = env.service.create_lora_training_client(args.model, rank=args.rank, seed=args.seed)
    tokenizer = training.get_tokenizer()
    train_qs, eval_qs, note = split_held_out(QUESTIONS, HELD_OUT, env.random_weights, "questions")
    teacher = env.service.create_sampling_client(base_model=args.model)  # the base model is the teacher
    teacher_prompts = [chat.prompt_tokens(tokenizer, with_system(config.instruction, q)) for q in eval_qs]
    teacher_rate = follow_rate(config.instruction, generate(teacher, tokenizer, teacher_prompts, config.max_tokens))
    data = teacher_data(teacher, tokenizer, train_qs, config)
    tokens = weighted_tokens(data)

    before, before_answers = evaluate(training, tokenizer, eval_qs, config, "before")
    metrics = Metrics(args.out)
    metrics.log(0, student_follows=before, teacher_follows=teacher_rate)
    progress = Progress(args.steps, "distill")
    adam = types.AdamParams(learning_rate=args.lr)
    for step in range(1, args.steps + 1):
        backward = training.forward_backward(data, "cross_entropy")
        update = training.optim_step(adam)
        row = {"train_loss": backward.result().loss / tokens}
        update.result()
        if is_eval_step(step, args.steps):
            row["student_follows"] = evaluate(training, tokenizer, eval_qs, config, f"step{step}")[0]
        metrics.log(step, **row)
        progress.update(**row)
    after, after_answers = evaluate(training, tokenizer, eval_qs, config, "after")
    for question, was, now in list(zip(eval_qs, before_answers, after_answers))[:3]:
        print(f"{question!r}: before {was!r}, after {now!r}", file=sys.stderr)
    metrics.plot(f"Context distillation on {args.model}")
    metrics.summary(
        {"student_follows": before},
        {"student_follows": after},
        note=f"{note}; the teacher, with the system prompt, follows it {teacher_rate:.2f}",
        teacher_follows=teacher_rate,
    )
    return {"before": before, "after": after, "teacher": teacher_rate}


if __name__ == "__main__":
    main()
