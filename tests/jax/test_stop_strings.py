"""StopStrings finds the same stopping token as decoding the whole completion after every token
(S3 as the emulator reads it), on the built-in tokenizer, multi-byte characters included."""

from __future__ import annotations

import numpy as np
import pytest

from backends.jax.stop_strings import StopStrings
from bios.tokenizer import Tokenizer

TOKENIZER = Tokenizer.builtin()
TEXTS = ["naïve café, déjà vu — ☃ snow", "def f(x):\n    return x ** 2  # 平方", "a  b\t\tc\n\n¿qué? 🙂 ok"]


def full_decode_stop(tokens: list[int], strings: tuple[str, ...]) -> int | None:
    texts = (TOKENIZER.decode(tokens[: n + 1]) for n in range(len(tokens)))
    return next((n for n, text in enumerate(texts) if any(s in text for s in strings)), None)


def cases():
    """(tokens, stop strings): substrings of encoded texts, and of random token runs."""
    rng = np.random.default_rng(0)
    for text in TEXTS:
        tokens = TOKENIZER.encode(text)
        for _ in range(12):
            i = int(rng.integers(0, len(text) - 1))
            yield tokens, (text[i : i + int(rng.integers(1, 6))],)
    for _ in range(12):
        tokens = rng.integers(0, 4096, 40).tolist()
        text = TOKENIZER.decode(tokens)
        i = int(rng.integers(0, len(text) - 4))
        yield tokens, ("never", text[i : i + int(rng.integers(1, 5))])


@pytest.mark.parametrize(("tokens", "strings"), list(cases()))
def test_the_tail_window_stops_where_full_decoding_does(tokens, strings):
    watch = StopStrings(strings, TOKENIZER.decode)
    expected = full_decode_stop(tokens, strings)
    assert expected is not None
    assert watch.first_stop(tokens, 0) == expected
    split = len(tokens) // 2  # checked in two calls, as chunks arrive
    first = watch.first_stop(tokens[:split], 0)
    assert (first if first is not None else watch.first_stop(tokens, split)) == expected


def test_no_stop_string_gives_none():
    tokens = TOKENIZER.encode("nothing to see here")
    assert StopStrings(("zzz",), TOKENIZER.decode).first_stop(tokens, 0) is None
