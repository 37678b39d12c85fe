"""Numbers that come with their uncertainty, and claims judged from them.

Intervals for proportions, means and any statistic (bootstrap), used by benchmarks and notebooks whenever a count
or an average over a small sample is reported; ``Claim`` pairs a paper's statement with our estimate and its controls
and computes a verdict (holds / does not hold / inconclusive), and ``claims_table`` / ``conclusions`` turn a list of
claims into the table and the markdown a reproduction notebook ends with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


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


def bootstrap_interval(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values``: ``(estimate, low, high)``.

    For statistics without a closed-form interval (a median; a rank correlation of pairs passed as rows of a
    ``[n, k]`` array: rows are resampled whole). Seeded, so a notebook prints the same interval on every run.
    """
    data = np.asarray(values, dtype=float)
    if data.shape[0] < 2:
        raise ValueError(f"bootstrap_interval needs at least 2 values, got {data.shape[0]}")
    from scipy.stats import bootstrap

    # Resample row indices, so that a row (e.g. one trial's pair of measures) stays together.
    result = bootstrap(
        (np.arange(data.shape[0]),),
        lambda rows: statistic(data[rows]),
        vectorized=False,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(statistic(data)), float(result.confidence_interval.low), float(result.confidence_interval.high)


HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Estimate:
    """A measured number with its interval: ``value`` in ``[low, high]`` (``low <= value <= high``)."""

    value: float
    low: float
    high: float
    detail: str = ""  # how it was measured, e.g. "12/64 refusals, exact binomial 95%"

    def __post_init__(self):
        if not self.low <= self.value <= self.high:
            raise ValueError(f"Estimate needs low <= value <= high, got {self.low} <= {self.value} <= {self.high}")

    @classmethod
    def proportion(cls, successes: int, trials: int, confidence: float = 0.95) -> Estimate:
        low, high = proportion_interval(successes, trials, confidence)
        return cls(successes / trials, low, high, f"{successes}/{trials}, exact binomial {confidence:.0%}")

    @classmethod
    def mean(cls, values: Sequence[float], confidence: float = 0.95) -> Estimate:
        mean, low, high = mean_interval(values, confidence)
        return cls(mean, low, high, f"mean of {len(values)}, t {confidence:.0%}")

    def __str__(self) -> str:
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"


@dataclass(frozen=True)
class Claim:
    """One claim of a paper, tested on this model.

    ``expect`` says what the paper's claim requires of ``estimate``:
      ``"below"`` / ``"above"`` a ``threshold`` (e.g. KL below 0.1), or ``"below control"`` / ``"above control"``
      (e.g. refusal rate below the unedited model's). Comparisons with controls use the intervals: the claim holds
      when the whole interval lies on the expected side of every control's interval (or of the threshold), does not
      hold when it lies wholly on the other side, and is inconclusive when they overlap. Overlap of two 95%
      intervals is a conservative test (it calls fewer differences than a test of the difference would).
    """

    statement: str
    paper: str  # the paper's figure or wording, with the source
    estimate: Estimate
    expect: str
    threshold: float | None = None
    controls: dict[str, Estimate] = field(default_factory=dict)

    def __post_init__(self):
        if self.expect not in ("below", "above", "below control", "above control"):
            raise ValueError(f"Claim.expect must be below/above [control], got {self.expect!r}")
        if self.expect in ("below", "above") and self.threshold is None:
            raise ValueError(f"Claim {self.statement!r}: expect={self.expect!r} needs a threshold")
        if self.expect.endswith("control") and not self.controls:
            raise ValueError(f"Claim {self.statement!r}: expect={self.expect!r} needs at least one control")

    @property
    def verdict(self) -> str:
        below = self.expect.startswith("below")
        if self.expect.endswith("control"):
            bounds = [(c.low, c.high) for c in self.controls.values()]
        else:
            assert self.threshold is not None  # checked in __post_init__
            bounds = [(self.threshold, self.threshold)]
        verdicts = [_side(self.estimate, low, high, below) for low, high in bounds]
        if all(v == HOLDS for v in verdicts):
            return HOLDS
        return DOES_NOT_HOLD if DOES_NOT_HOLD in verdicts else INCONCLUSIVE


def _side(estimate: Estimate, low: float, high: float, below: bool) -> str:
    """Where ``estimate``'s interval lies relative to the interval ``[low, high]`` on the expected side."""
    if below:
        return HOLDS if estimate.high < low else DOES_NOT_HOLD if estimate.low > high else INCONCLUSIVE
    return HOLDS if estimate.low > high else DOES_NOT_HOLD if estimate.high < low else INCONCLUSIVE


def claims_table(claims: Sequence[Claim]) -> pd.DataFrame:
    """One row per claim: statement, the paper's figure, our estimate with its interval, the controls, the verdict."""
    rows = []
    for claim in claims:
        if claim.expect.endswith("control"):
            against = "; ".join(f"{name} {c}" for name, c in claim.controls.items())
        else:
            against = f"{claim.expect} {claim.threshold:g}"
            if claim.controls:
                against += " (controls: " + "; ".join(f"{n} {c}" for n, c in claim.controls.items()) + ")"
        rows.append(
            {
                "claim": claim.statement,
                "paper": claim.paper,
                "ours": str(claim.estimate),
                "measured as": claim.estimate.detail,
                "expected": claim.expect,
                "compared with": against,
                "verdict": claim.verdict,
            }
        )
    return pd.DataFrame(rows)


def conclusions(claims: Sequence[Claim]) -> str:
    """Markdown sentences computed from the claims (for ``IPython.display.Markdown``), never typed by hand."""
    lines = []
    for claim in claims:
        table = claims_table([claim]).iloc[0]
        lines.append(f"- **{claim.verdict}**: {claim.statement} (ours {table['ours']}; {table['compared with']}).")
    counts = {v: sum(c.verdict == v for c in claims) for v in (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    return f"On this model: {summary}.\n\n" + "\n".join(lines)


def clustered_estimate(
    frame: pd.DataFrame,
    value: str | Callable[[pd.DataFrame], pd.Series],
    *,
    cluster: str = "prompt",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Mean of ``value`` over all rows of ``frame`` (e.g. every (seed, test question) pair), with a percentile
    bootstrap that resamples whole clusters (``cluster``: the question), so a question in several seeds' test
    splits is not counted as independent evidence. ``value``: a column (bools count as 0/1; NaN rows are dropped)
    or a function of the frame returning one number per row (e.g. a difference of two arms' columns).
    """
    values = value(frame) if callable(value) else frame[value]
    data = pd.DataFrame({"cluster": frame[cluster].to_numpy(), "v": values.astype(float).to_numpy()}).dropna()
    if data.empty:
        raise ValueError("clustered_estimate: no rows with a value")
    grouped = data.groupby("cluster", sort=True)["v"].agg(["sum", "count"])
    rows = grouped.to_numpy(dtype=float)  # [clusters, 2]: sum of values, number of rows

    def ratio(r: np.ndarray) -> float:
        return float(r[:, 0].sum() / r[:, 1].sum())

    n_rows, n_clusters = int(rows[:, 1].sum()), len(rows)
    detail = f"mean of {n_rows} (seed, question) rows over {n_clusters} questions, question bootstrap {confidence:.0%}"
    if n_clusters < 2:
        v = ratio(rows)
        return Estimate(v, -math.inf, math.inf, detail)
    estimate, low, high = bootstrap_interval(rows, ratio, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return Estimate(estimate, min(low, estimate), max(high, estimate), detail)
