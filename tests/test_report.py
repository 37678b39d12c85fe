"""measure/report.py: intervals checked against known values, verdicts on constructed claims of every kind."""

import math

import numpy as np
import pytest

from hereticlab.measure.report import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    Claim,
    Estimate,
    bootstrap_interval,
    claims_table,
    conclusions,
    mean_interval,
    proportion_interval,
)


def test_proportion_interval_matches_clopper_pearson_closed_forms():
    # 0 of n: upper bound 1 - (alpha/2)^(1/n); n of n: lower bound (alpha/2)^(1/n)
    low, high = proportion_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-9)
    low, high = proportion_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 10), rel=1e-9)
    low, high = proportion_interval(314, 320)  # the interval must contain the point estimate and be narrow-ish
    assert low < 314 / 320 < high and high - low < 0.05


def test_proportion_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="successes <= trials"):
        proportion_interval(5, 4)
    with pytest.raises(ValueError, match="trials > 0"):
        proportion_interval(0, 0)


def test_mean_interval_uses_student_t():
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 * 1.0 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n), sd = 1
    assert mean == 2.0 and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    assert mean_interval([5.0])[1:] == (-math.inf, math.inf)


def test_bootstrap_interval_is_seeded_and_covers_the_estimate():
    values = np.random.default_rng(0).normal(1.0, 1.0, size=200)
    first = bootstrap_interval(values, np.median, seed=3)
    assert first == bootstrap_interval(values, np.median, seed=3)
    estimate, low, high = first
    assert low < estimate < high and 0.6 < estimate < 1.4
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_interval([1.0])


def test_bootstrap_interval_resamples_rows_of_pairs_whole():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    rows = np.stack([x, x + 0.5 * rng.normal(size=60)], axis=1)  # strongly related pairs
    rho, low, high = bootstrap_interval(rows, lambda r: spearmanr(r[:, 0], r[:, 1]).statistic, n_resamples=500)
    assert rho == pytest.approx(spearmanr(rows[:, 0], rows[:, 1]).statistic)
    assert 0.6 < low < rho < high <= 1.0
    # unrelated pairs: the interval covers 0
    shuffled = np.stack([x, rng.permutation(x)], axis=1)
    _, low, high = bootstrap_interval(shuffled, lambda r: spearmanr(r[:, 0], r[:, 1]).statistic, n_resamples=500)
    assert low < 0 < high


def test_estimate_refuses_a_value_outside_its_interval():
    with pytest.raises(ValueError, match="low <= value <= high"):
        Estimate(0.5, 0.6, 0.9)


def test_threshold_verdicts():
    def kl_claim(low, high):
        return Claim("KL stays small", "KL < 0.1 (Arditi et al.)", Estimate((low + high) / 2, low, high), "below", 0.1)

    assert kl_claim(0.02, 0.08).verdict == HOLDS
    assert kl_claim(0.05, 0.15).verdict == INCONCLUSIVE
    assert kl_claim(0.5, 0.8).verdict == DOES_NOT_HOLD


def test_control_verdicts_need_every_control_separated():
    unedited = Estimate.proportion(60, 64)
    random_dir = Estimate.proportion(58, 64)
    ablated = Estimate.proportion(3, 64)

    def refusal_claim(estimate, **controls):
        return Claim("ablation removes refusal", "~0% refusal", estimate, "below control", controls=controls)

    assert refusal_claim(ablated, unedited=unedited, random=random_dir).verdict == HOLDS
    assert refusal_claim(Estimate.proportion(57, 64), unedited=unedited).verdict == INCONCLUSIVE
    # one control separated, the other overlapping: not yet a result
    assert refusal_claim(
        Estimate.proportion(45, 64), unedited=unedited, random=Estimate.proportion(40, 64)
    ).verdict == (INCONCLUSIVE)
    # wholly on the wrong side of a control
    higher = Claim(
        "steering raises the trait", "+", Estimate.proportion(2, 64), "above control", controls={"u": ablated}
    )
    assert higher.verdict == INCONCLUSIVE
    assert Claim("x", "+", Estimate.proportion(1, 64), "above control", controls={"u": unedited}).verdict == (
        DOES_NOT_HOLD
    )


def test_claim_rejects_an_incomplete_specification():
    with pytest.raises(ValueError, match="needs a threshold"):
        Claim("s", "p", Estimate(0.1, 0.0, 0.2), "below")
    with pytest.raises(ValueError, match="needs at least one control"):
        Claim("s", "p", Estimate(0.1, 0.0, 0.2), "below control")
    with pytest.raises(ValueError, match="expect"):
        Claim("s", "p", Estimate(0.1, 0.0, 0.2), "smaller", 0.1)


def test_table_and_conclusions_are_computed_from_the_claims():
    claims = [
        Claim("KL stays small", "KL < 0.1", Estimate(0.7, 0.6, 0.8, "mean of 3 seeds"), "below", 0.1),
        Claim(
            "ablation removes refusal",
            "~0%",
            Estimate.proportion(2, 64),
            "below control",
            controls={"unedited": Estimate.proportion(60, 64)},
        ),
    ]
    table = claims_table(claims)
    assert list(table["verdict"]) == [DOES_NOT_HOLD, HOLDS]
    assert table.loc[1, "measured as"] == "2/64, exact binomial 95%"
    text = conclusions(claims)
    assert text.startswith("On this model: 1 holds, 1 does not hold.")
    assert "**does not hold**: KL stays small (ours 0.7 [0.6, 0.8]; below 0.1)" in text
