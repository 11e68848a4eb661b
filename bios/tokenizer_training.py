"""Offline, deterministic training of Bios's built-in tokenizer.

This module owns the shipped files ``bios/data/tokenizer/tokenizer.json`` and
``bios/data/tokenizer/tokenizer_config.json``; regenerate them with
``python -m bios.tokenizer_training``. The tokenizer is a byte-level BPE with a
vocabulary of exactly 4096 tokens (special tokens included), trained on a corpus
assembled locally without any network access: the docstrings of a fixed list of
standard-library modules plus generated simple English sentences in the style of
the Bios demo tasks (word reversal, capital-city questions, small arithmetic),
both from ``bios.tokenizer_corpus``. The output depends only on the Python
version (stdlib docstrings) and the ``tokenizers`` version.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from bios.tokenizer_corpus import training_corpus

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0..3
OUTPUT_DIR = Path(__file__).resolve().parent / "data" / "tokenizer"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer() -> Tokenizer:
    """Train and return the byte-level BPE; identical inputs give an identical tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        max_token_length=16,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = training_corpus()
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    bos = SPECIAL_TOKENS[0]  # prepended as BOS when add_special_tokens=True
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, 0)]
    )
    ids, size = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS], tokenizer.get_vocab_size()
    if ids != list(range(len(SPECIAL_TOKENS))) or size != VOCAB_SIZE:
        raise RuntimeError(f"unexpected special token ids {ids} or vocab size {size}")
    return tokenizer


def tokenizer_config() -> dict:
    """The Hugging Face style tokenizer_config.json contents for the built-in tokenizer."""
    return {
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def main(output_dir: Path = OUTPUT_DIR) -> None:
    """Write tokenizer.json and tokenizer_config.json into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(output_dir / "tokenizer.json"), pretty=True)
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (output_dir / "tokenizer_config.json").write_text(config, encoding="utf-8")
    print(f"wrote {output_dir}/tokenizer.json and tokenizer_config.json")


if __name__ == "__main__":
    main()
