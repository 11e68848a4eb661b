"""The two statistical tests of the suite, for quantities a backend draws at random.

`fit_problem(drawn, expected)`: do draws of token ids follow the distribution `expected` [V]?
Every draw must lie in its support, and Pearson's statistic over `fit_bins` must stay below
the threshold whose false-alarm rate is tolerances.FIT_FALSE_ALARM.

`mean_problem(values, mean)`: are independent draws `values` centred on `mean`? Student's
one-sample t statistic must stay below the threshold whose false-alarm rate is
tolerances.MEAN_FALSE_ALARM.

Each returns (None when the draws pass, else one line saying what failed; the statistic as a
fraction of its threshold, for the report's worst deviation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conformance import tolerances as tol


def fit_bins(expected: np.ndarray, draws: int) -> list[np.ndarray]:
    """The bins of the fit test for `draws` draws from `expected` [V]: each token expected at
    least FIT_MIN_EXPECTED times is a bin of its own (most likely first), the other tokens of the
    support share one bin, which is merged into the last single-token bin if even together they
    are expected fewer times. Returns arrays of token ids; a single bin when no two can be formed."""
    support = np.flatnonzero(expected > 0)
    support = support[np.argsort(-expected[support], kind="stable")]
    big = draws * expected[support] >= tol.FIT_MIN_EXPECTED
    bins = [np.array([token]) for token in support[big]]
    rest = support[~big]
    if len(rest):
        if draws * expected[rest].sum() >= tol.FIT_MIN_EXPECTED or not bins:
            bins.append(rest)
        else:
            bins[-1] = np.concatenate([bins[-1], rest])
    return bins


def fit_problem(drawn: Sequence[int], expected: np.ndarray) -> tuple[str | None, float]:
    """(why the token ids `drawn` do not fit `expected` [V] or None, the Pearson statistic as a
    fraction of its threshold). A draw outside the support fails at once."""
    tokens = np.asarray(drawn, dtype=np.int64)
    outside = sorted({int(t) for t in tokens if expected[t] == 0})
    if outside:
        return f"drew tokens {outside[:8]} that the reference never keeps at these settings", float("inf")
    n = len(tokens)
    counts = np.bincount(tokens, minlength=len(expected))
    bins = fit_bins(expected, n)
    if len(bins) < 2:
        return None, 0.0
    observed = np.array([counts[b].sum() for b in bins], dtype=np.float64)
    wanted = np.array([n * expected[b].sum() for b in bins])
    statistic = float(np.sum((observed - wanted) ** 2 / wanted))
    threshold = tol.fit_threshold(len(bins) - 1)
    if statistic > threshold:
        worst = int(np.argmax((observed - wanted) ** 2 / wanted))
        return (
            f"draw frequencies do not fit the reference distribution: Pearson statistic {statistic:.1f} > "
            f"{threshold:.1f} ({len(bins) - 1} degrees of freedom, false-alarm rate {tol.FIT_FALSE_ALARM:g}); "
            f"worst bin tokens {bins[worst][:4].tolist()}: drawn {int(observed[worst])} times, expected "
            f"{wanted[worst]:.1f}",
            statistic / threshold,
        )
    return None, statistic / threshold


def mean_problem(values: Sequence[float], mean: float) -> tuple[str | None, float]:
    """(why independent draws `values` (n >= 3) are not centred on `mean`, or None; |t| as a
    fraction of its threshold)."""
    x = np.asarray(values, dtype=np.float64)
    spread = float(x.std(ddof=1))
    t = (float(x.mean()) - mean) / (spread / np.sqrt(len(x))) if spread > 0 else 0.0
    if spread == 0 and float(x.mean()) != mean:
        t = float("inf")
    threshold = tol.mean_threshold(len(x))
    if abs(t) > threshold:
        return (
            f"mean {x.mean():.4f} of {len(x)} draws (sd {spread:.4f}) is not {mean}: |t| = {abs(t):.1f} > "
            f"{threshold:.1f} (false-alarm rate {tol.MEAN_FALSE_ALARM:g}); draws {np.round(x, 4).tolist()}",
            abs(t) / threshold,
        )
    return None, abs(t) / threshold
