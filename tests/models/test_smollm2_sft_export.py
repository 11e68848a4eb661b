"""SmolLM2 learns invented facts with examples/sft.py (reduced), and both exports of the trained
adapter make `transformers` (+ `peft`) state those facts on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers

from bios.export import export_merged, export_peft
from bios.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def sft():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import sft as recipe

        yield recipe
    finally:
        sys.path.remove(str(EXAMPLES))


def _greedy(model, tokenizer: Tokenizer, messages: list[dict[str, str]], new_tokens: int = 24) -> str:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(prompt) :].tolist(), skip_special_tokens=True)


def test_sft_teaches_smollm2_facts_that_its_exports_then_state(
    sft, smollm2, smollm2_home: Path, tmp_path: Path
) -> None:
    facts = 3
    result = sft.main(
        [
            "--model",
            MODEL,
            "--backend",
            "jax",
            "--steps",
            "8",
            "--lr",
            "3e-3",
            "--facts",
            str(facts),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    before, after = result["before"], result["after"]
    assert after["test_loss"] < 0.6 * before["test_loss"]  # held-out paraphrases of the taught facts
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["checkpoint"] == result["checkpoint"] and (tmp_path / "run" / "curves.png").stat().st_size > 0

    tokenizer = Tokenizer.from_directory(smollm2.directory)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        export_merged(result["checkpoint"], tmp_path / "merged"), dtype=torch.float32
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2.directory, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, export_peft(result["checkpoint"], tmp_path / "peft"))
    for questions, answer in sft.FACTS[:facts]:
        conversation = sft.conversation(questions[0])  # a trained phrasing
        key = answer.split()[0] if answer.split()[0] not in ("The", "A") else answer.split()[-1].rstrip(".")
        for name, model in (("merged", merged), ("peft", adapted)):
            said = _greedy(model, tokenizer, conversation)
            assert key in said, (name, questions[0], said)
    with adapted.disable_adapter():
        assert "Ada Vell" not in _greedy(
            adapted, tokenizer, sft.conversation(sft.FACTS[0][0][0])
        )  # the base model does not know
