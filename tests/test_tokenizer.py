"""Tests for the built-in tokenizer and the Tokenizer wrapper."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from bios.tokenizer import Tokenizer

SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|pad|>": 3}
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris"},
]
RENDERED = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.builtin()


def test_vocab_size_and_special_ids(tok):
    assert tok.vocab_size == 4096
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 2, 3)
    for token, token_id in SPECIALS.items():
        assert tok.token_to_id(token) == token_id
        assert tok.encode(token, add_special_tokens=False) == [token_id]
    assert tok.token_to_id("definitely-not-a-token") is None


def test_special_tokens_inside_text_are_single_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert ids.count(1) == 1 and ids.count(2) == 1


def test_bos_only_with_add_special_tokens(tok):
    with_bos = tok.encode("hello world")
    without = tok.encode("hello world", add_special_tokens=False)
    assert with_bos == [0] + without
    assert 0 not in without
    assert tok.encode("") == [0] and tok.encode("", add_special_tokens=False) == []


@pytest.mark.parametrize(
    "text",
    [
        "the cat sat on the mat",
        "  leading and trailing spaces \t\n",
        "line one\nline two\r\n\nline four",
        "naïve café — Ünïcödé, 日本語, Ελληνικά, עברית",
        "emoji: 👋🏽 👨‍👩‍👧 🇫🇷 ✨",
        "<|im_start|>user\nhi<|im_end|>\n",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.int64)) == text
    assert tok.decode(tok.encode(text)) == "<|endoftext|>" + text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace("<|im_start|>", "").replace(
        "<|im_end|>", ""
    )


def test_decode_accepts_numpy_scalars_and_lists(tok):
    ids = tok.encode("What is the capital of France? Paris")
    assert tok.decode([np.int32(i) for i in ids]) == tok.decode(ids)
    assert tok.decode(np.array(ids, dtype=np.uint32)) == tok.decode(ids)


def test_chat_template(tok):
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED
    prompt = tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(CONVERSATION)
    assert ids == tok.encode(RENDERED, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2 and 0 not in ids
    assert tok.decode(ids) == RENDERED


def test_english_is_compact(tok):
    assert len(tok.encode("the cat sat on the mat", add_special_tokens=False)) <= 8
    assert len(tok.encode("What is the capital of France? Paris", add_special_tokens=False)) <= 10


def test_from_directory_copy(tok, tmp_path):
    source = Path(tok.name_or_path)
    shutil.copy(source / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(source / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    copy = Tokenizer.from_directory(tmp_path)
    assert copy.name_or_path == str(tmp_path)
    assert copy.vocab_size == tok.vocab_size
    assert copy.encode("reverse the words: the cat sat") == tok.encode("reverse the words: the cat sat")
    assert copy.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED


def test_without_config_has_no_specials_or_template(tok, tmp_path):
    shutil.copy(Path(tok.name_or_path) / "tokenizer.json", tmp_path / "tokenizer.json")
    bare = Tokenizer.from_directory(tmp_path)
    assert bare.bos_token_id is None and bare.eos_token_id is None and bare.pad_token_id is None
    with pytest.raises(ValueError, match="chat_template"):
        bare.apply_chat_template(CONVERSATION)


def test_template_helpers_and_missing_directory(tok, tmp_path):
    shutil.copy(Path(tok.name_or_path) / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {
        "eos_token": {"content": "<|im_end|>"},
        "chat_template": (
            "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
            "{{ m['content'] | tojson }}{{ eos_token }}{% endfor %}"
        ),
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    custom = Tokenizer.from_directory(tmp_path)
    assert custom.eos_token_id == 2
    assert custom.apply_chat_template([{"role": "user", "content": "é"}], tokenize=False) == '"é"<|im_end|>'
    with pytest.raises(ValueError, match="no tools"):
        custom.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_directory(tmp_path / "missing")


def test_immutable_and_cached(tok):
    assert Tokenizer.builtin() is tok
    with pytest.raises(AttributeError):
        tok.vocab_size = 5
    with pytest.raises(AttributeError):
        tok._tokenizer = None
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("hi there") == tok.encode("hi there") and clone.eos_token_id == 2
