"""Numbers that come with their uncertainty: intervals for proportions and means, used by benchmarks and notebooks
whenever a count or an average over a small sample is reported."""

from __future__ import annotations

import math
from collections.abc import Sequence


def proportion_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion ``successes / trials``.

    Conservative at every sample size, including 0 or ``trials`` successes, where normal approximations collapse.
    Returns ``(low, high)`` in [0, 1].
    """
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"proportion_interval needs 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Student-t interval for the mean of ``values``: ``(mean, low, high)``. One value gives an infinite interval."""
    if len(values) == 0:
        raise ValueError("mean_interval needs at least one value")
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half
