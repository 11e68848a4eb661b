"""S1 as this suite states it, the ways a sampler plausibly misreads it, and the filter
settings that tell them apart.

`sampling_distribution(lp, temperature, top_k, top_p)` is the exact next-token distribution
S1 (docs/losses.md) prescribes for unscaled log-probabilities `lp` [V]: temperature first,
then top-k, then top-p over the top-k set renormalised, then a draw from what is kept. It is
written here from the text of S1 alone, not taken from any backend. `MISREADINGS` are the
same computation with one rule changed, each a mistake real samplers make (filters applied in
another order, top-p on the unscaled probabilities, the temperature applied twice or not at
all, the top-p cut one token off). `choose_filters` picks, for a given `lp`, the settings under
which every misreading draws visibly differently from S1, so that a property drawing a few
hundred samples at those settings catches any of them.

Shapes: V vocabulary; every distribution is [V] float64 over token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from conformance import tolerances as tol
from conformance.statistics import fit_bins


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _prefix_reaching(probs: np.ndarray, top_p: float) -> int:
    """Length of the smallest prefix of `probs` (sorted descending) whose sum is >= top_p (>= 1)."""
    return min(int(np.searchsorted(np.cumsum(probs), top_p, side="left")) + 1, len(probs))


@dataclass(frozen=True)
class Ranked:
    """Log-probabilities [V] in S1's order, sorted once: `order` the token ids by descending lp
    (ties by lower id), `z` the lp in that order."""

    order: np.ndarray
    z: np.ndarray


def ranked(lp: np.ndarray) -> Ranked:
    """`lp` [V] sorted for S1."""
    order = np.argsort(-lp, kind="stable")
    return Ranked(order, lp[order])


def _spread(order: np.ndarray, kept: np.ndarray, vocab: int) -> np.ndarray:
    """A distribution over token ids from probabilities `kept` of the first len(kept) of `order`."""
    out = np.zeros(vocab)
    out[order[: len(kept)]] = kept / kept.sum()
    return out


def _filtered(
    r: Ranked,
    temperature: float,
    top_k: int,
    top_p: float,
    *,
    top_p_first: bool = False,
    top_p_unscaled: bool = False,
    cut_shift: int = 0,
) -> np.ndarray:
    """The draw distribution [V] of a sampler following S1 except where a flag says otherwise:
    `top_p_first` applies top-p to the whole vocabulary before top-k, `top_p_unscaled` decides
    the top-p prefix on the probabilities before temperature, `cut_shift` moves the top-p cut by
    that many tokens."""
    z = r.z
    k = len(z) if top_k == -1 else top_k
    tempered = _softmax(z / temperature)
    if top_p_first:
        n = min(_prefix_reaching(tempered, top_p), k)
    else:
        deciding = _softmax(z[:k]) if top_p_unscaled else tempered[:k] / tempered[:k].sum()
        n = _prefix_reaching(deciding, top_p)
    n = int(np.clip(n + cut_shift, 1, k))
    return _spread(r.order, tempered[:n], len(z))


def sampling_distribution(lp: np.ndarray, temperature: float, top_k: int = -1, top_p: float = 1.0) -> np.ndarray:
    """S1's distribution [V] of the next token for unscaled log-probabilities `lp` [V] (any
    additive constant), temperature > 0: z/temperature, top-k (ties by lower id), top-p over
    the renormalised top-k set (the smallest prefix reaching top_p), renormalised."""
    return _filtered(ranked(lp), temperature, top_k, top_p)


Misreading = Callable[[Ranked, float, int, float], np.ndarray]

MISREADINGS: dict[str, Misreading] = {
    "top-p before top-k": lambda r, t, k, p: _filtered(r, t, k, p, top_p_first=True),
    "top-p before temperature": lambda r, t, k, p: _filtered(r, t, k, p, top_p_unscaled=True),
    "temperature twice": lambda r, t, k, p: _filtered(r, t * t, k, p),
    "temperature ignored": lambda r, t, k, p: _filtered(r, 1.0, k, p),
    "top-p one token short": lambda r, t, k, p: _filtered(r, t, k, p, cut_shift=-1),
    "top-p one token long": lambda r, t, k, p: _filtered(r, t, k, p, cut_shift=1),
}
"""Name → the draw distribution of a sampler that breaks S1 in that one way, for ranked lp."""


@dataclass(frozen=True)
class Filters:
    """Sampling settings (temperature, top_k, top_p), the S1 distribution they give [V], and
    how surely `draws` samples tell each misreading apart from it (`power`: the misreading's
    name → its score, >= 1 meaning a miss is below tolerances.FIT_FALSE_ALARM)."""

    temperature: float
    top_k: int
    top_p: float
    expected: np.ndarray
    power: dict[str, float]


TEMPERATURES = (0.05, 0.1, 0.2, 0.35, 0.6, 2.0, 4.0)
"""Temperatures tried; 1 is left out, since there the temperature's own mistakes are invisible."""
TOP_KS = (-1, 2, 3, 4, 5, 6, 8, 12)


def separation(expected: np.ndarray, other: np.ndarray, draws: int) -> float:
    """How surely `draws` samples from `other` fail `statistics.fit_problem` against
    `expected` (both [V]), as a score: >= 1 when some draw is expected outside `expected`'s
    support ln(1/FIT_FALSE_ALARM) times over, or when the Pearson statistic's expected excess
    over its degrees of freedom, draws · χ²(other ‖ expected) on the test's bins, is at least
    twice the test's threshold."""
    outside = float(other[expected == 0].sum())
    bins = fit_bins(expected, draws)
    p = np.array([expected[b].sum() for b in bins])
    q = np.array([other[b].sum() for b in bins])
    threshold = tol.fit_threshold(len(bins) - 1)
    return max(
        draws * outside / -np.log(tol.FIT_FALSE_ALARM), draws * float(np.sum((q - p) ** 2 / p)) / (2 * threshold)
    )


def _candidates(r: Ranked, temperature: float, top_k: int) -> list[float]:
    """top_p values halfway between two consecutive cumulative masses of the renormalised
    top-k set (so no token sits near the cut), plus 1.0 (no top-p)."""
    z = r.z
    k = len(z) if top_k == -1 else top_k
    kept = _softmax(z[:k] / temperature)
    cumulative = np.cumsum(kept)[: min(k, 16)]
    mids = [(a + b) / 2 for a, b in zip(np.concatenate([[0.0], cumulative[:-1]]), cumulative)]
    return [float(p) for p in mids[1:] if p < 1 - 1e-3] + [1.0]


def _clear_of_ties(r: Ranked, top_k: int) -> bool:
    """The k-th and (k+1)-th largest lp differ by far more than float32 rounding moves them."""
    if top_k == -1:
        return True
    return r.z[top_k - 1] - r.z[top_k] > 10 * tol.KEPT_SET_LOGIT_SLACK


def choose_filters(lp: np.ndarray, draws: int, *, top_k_and_top_p: bool) -> Filters:
    """The settings under which `draws` samples best tell S1 from every misreading for
    unscaled log-probabilities `lp` [V]: the largest smallest `separation`, among settings
    whose draws fill at least two bins of the fit test.
    With `top_k_and_top_p` both filters are active; otherwise neither is (temperature alone,
    every token kept), and only the temperature's misreadings are scored."""
    best: Filters | None = None
    r = ranked(lp)
    names = list(MISREADINGS) if top_k_and_top_p else ["temperature twice", "temperature ignored"]
    for temperature in TEMPERATURES:
        for top_k in TOP_KS if top_k_and_top_p else (-1,):
            if (top_k == -1) == top_k_and_top_p or not _clear_of_ties(r, top_k):
                continue
            for top_p in _candidates(r, temperature, top_k) if top_k_and_top_p else [1.0]:
                if top_k_and_top_p and top_p == 1.0:
                    continue
                expected = _filtered(r, temperature, top_k, top_p)
                if len(fit_bins(expected, draws)) < 2:
                    continue
                power = {
                    name: separation(expected, MISREADINGS[name](r, temperature, top_k, top_p), draws) for name in names
                }
                if best is None or min(power.values()) > min(best.power.values()):
                    best = Filters(temperature, top_k, top_p, expected, power)
    if best is None:
        raise AssertionError("no sampling settings keep two tokens likely enough to test")
    return best
