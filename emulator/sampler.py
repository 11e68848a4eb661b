"""Decoding of docs/losses.md S1–S3: the choice of each next token (greedy, temperature,
top-k, top-p), the logprob reported for it, and when a completion stops.

The model is reached through `step(token) → logits [V]` of the position after `token` (the
backend feeds it from a KV cache), so this module knows nothing of weights.
Shapes: V vocab, T context tokens, N generated tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from bios.backend import SampledOutput
from bios.types import StopReason
from emulator.ops import log_softmax

Step = Callable[[int], np.ndarray]
Decode = Callable[[Sequence[int]], str]


def kept_set(z: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """S1 filtering of temperature-scaled logits z [V]: top-k keeps the k largest, then top-p
    keeps the smallest prefix (by descending probability, ties by lower id) of the top-k
    renormalised distribution whose cumulative probability is `>= top_p` (at least one token).

    Returns (token ids [n] in that order, their renormalised probabilities [n]).
    """
    order = np.argsort(-z, kind="stable")
    if top_k != -1:
        order = order[:top_k]
    probs = np.exp(z[order] - z[order[0]])
    probs /= probs.sum()
    n_kept = min(int(np.searchsorted(np.cumsum(probs), top_p, side="left")) + 1, len(order))
    kept = probs[:n_kept]
    return order[:n_kept], kept / kept.sum()


def next_token(z_raw: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """S1: temperature 0 takes `argmax z` (lowest id on ties); otherwise one uniform draw from
    the renormalised kept set of `z / temperature` by inverse CDF. z_raw: [V]."""
    if temperature == 0:
        return int(np.argmax(z_raw))
    ids, probs = kept_set(z_raw / temperature, top_k, top_p)
    index = int(np.searchsorted(np.cumsum(probs), rng.random(), side="right"))
    return int(ids[min(index, len(ids) - 1)])


def is_stop(
    generated: Sequence[int], stop_token_ids: Sequence[int], stop_strings: Sequence[str], decode: Decode
) -> bool:
    """S3: the last generated token is a stop token id, or the decoded completion contains a stop string."""
    if generated[-1] in stop_token_ids:
        return True
    if not stop_strings:
        return False
    text = decode(list(generated))
    return any(s in text for s in stop_strings)


def generate(
    step: Step,
    first_logits: np.ndarray,
    prompt_length: int,
    *,
    max_tokens: int,
    max_seq_len: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stop_token_ids: Sequence[int],
    stop_strings: Sequence[str],
    rng: np.random.Generator,
    decode: Decode,
) -> SampledOutput:
    """S1–S3 for one completion of a prompt of `prompt_length` tokens whose next-token logits
    are `first_logits` [V]; `step(token)` appends a token and returns the logits after it.

    Each token's logprob is `log_softmax(z_raw)[token]` (S2). Stops with "stop" after a stop
    token or stop string (kept in `tokens`), else "length" at `max_tokens` or when prompt plus
    completion reach `max_seq_len`. Returns tokens [N] int64 and logprobs [N] float64.
    """
    tokens: list[int] = []
    logprobs: list[float] = []
    reason: StopReason = "length"
    z = first_logits
    while len(tokens) < max_tokens and prompt_length + len(tokens) < max_seq_len:
        if tokens:
            z = step(tokens[-1])
        token = next_token(z, temperature, top_k, top_p, rng)
        tokens.append(token)
        logprobs.append(float(log_softmax(z)[token]))
        if is_stop(tokens, stop_token_ids, stop_strings, decode):
            reason = "stop"
            break
    return SampledOutput(np.asarray(tokens, dtype=np.int64), np.asarray(logprobs, dtype=np.float64), reason)
