"""S3's stop strings, checked as tokens arrive without decoding the whole completion each time.

A stop string that first appears in the decoded completion once token n is added must use some
of token n's bytes (decoding is per-byte, so the text of the earlier tokens does not change
but for an unfinished character at its end, which token n completes). A string of b UTF-8
bytes touches at most b tokens, each adding at least one byte; so decoding the last b + 1
tokens finds it — the extra token in front keeps decoders that treat a text's first token
specially (dropping a leading space) away from it. Each new token thus costs one decode of at
most b + 1 tokens: O(tokens) decoded in all, where re-decoding the completion costs O(tokens²).

Imports nothing of the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StopStrings:
    """A sample's stop strings and the tail window that finds them. Immutable."""

    __slots__ = ("_decode", "_strings", "_window")

    def __init__(self, strings: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        """`strings`: the stop strings (non-empty list); `decode`: token ids → text."""
        self._strings = tuple(strings)
        self._decode = decode
        self._window = max(len(s.encode("utf-8")) for s in self._strings) + 1

    def first_stop(self, tokens: Sequence[int], start: int) -> int | None:
        """The first n >= `start` at which the decoded `tokens[: n + 1]` contains a stop string
        (its tokens before `start` were checked already), or None. Decodes at most
        `len(tokens) - start` windows of b + 1 tokens (b: the longest string's UTF-8 bytes)."""
        for n in range(start, len(tokens)):
            tail = self._decode(list(tokens[max(0, n + 1 - self._window) : n + 1]))
            if any(s in tail for s in self._strings):
                return n
        return None
