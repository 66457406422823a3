"""Confidence intervals over seeds, and the test between two methods that carries both the
seed-to-seed and the test-example variance.

Why not a bootstrap over test examples (what peftlab did before): averaging each example's
score over seeds and resampling examples leaves out the variation between training draws and
initialisations, so two equally good methods were called different in 8-47% of simulated
studies at the 0.05 level. Why not a hierarchical bootstrap (seeds, then examples): with 3
seeds, a resample of seeds takes one of only 10 multisets and the percentile interval is
about the range of the seed means, which excludes zero in about a quarter of null studies.
Why not a t-test over the seeds' mean scores: it treats the test set as fixed, so two methods
that are right on different examples are called different whenever the test set happens to
favour one of them. scipy has no test for this two-way crossed design, hence this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

TEST_NAME = ("crossed random-effects t-test: seeds x test examples, paired by seed and "
             "example, Satterthwaite degrees of freedom taken at an upper confidence bound "
             "of the seed variance")
MIN_SEEDS = 3  # below this, no interval over seeds and no test between seeded methods
POWER = 0.8  # the power at which a comparison's smallest detectable difference is given
# The seed mean square's upper bound, at confidence 1 - q(alpha) with q(alpha) = this * sqrt(alpha),
# enters the degrees of freedom (see crossed_test). 0.7 keeps every level at or below nominal in
# the worst case over the seed share of the variance (normal model, 3-6 seeds: 0.98x at 0.05,
# 0.87x at 0.01, 0.70x at 0.001 with 3 seeds), checked on simulated 0/100 scores in the tests.
SEED_BOUND = 0.7
LOG10_P_FLOOR = 40  # p-values below 1e-40 are not resolved further


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, std, ci_low, ci_high) with a Student-t interval over seeds (NaN CI for one seed)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return (math.nan,) * 4
    mean = float(values.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


@dataclass(frozen=True)
class Comparison:
    difference: float  # mean(a) - mean(b) over seeds and examples
    ci_low: float
    ci_high: float
    p_value: float  # two-sided, H0: equal expected scores
    df: float  # degrees of freedom of the interval (at level 0.05)
    seeds: int  # seed pairs used (1: neither side depends on the seed)
    examples: int
    se: float = math.nan  # standard error of the difference
    detectable: float = math.nan  # smallest |difference| found at POWER, two-sided 0.05


def untested(difference: float, seeds: int, examples: int) -> Comparison:
    return Comparison(difference, math.nan, math.nan, math.nan, math.nan, seeds, examples)


def _seed_bound_q(alpha: float) -> float:
    return min(0.5, SEED_BOUND * math.sqrt(alpha))


def crossed_test(d: np.ndarray, level: float = 0.95) -> Comparison:
    """Test the mean of paired differences `d` (seeds x examples) against zero.

    The model is d[s, j] = delta + seed_s + example_j + noise_sj, seeds and examples both drawn
    at random (a two-way crossed random-effects design without replication, as for subjects
    and items in Clark 1973). With the ANOVA mean squares MS_seed, MS_example and MS_residual,
    Var(mean) = (MS_seed + MS_example - MS_residual) / (seeds * examples), bounded below by
    MS_residual / (seeds * examples), since every term of the true variance is non-negative.

    Degrees of freedom: Satterthwaite's (1946), plugging in MS_seed, jump towards the examples'
    when MS_seed is small by chance (it has only seeds - 1 of them), exactly when the variance
    is underestimated: simulated, that test rejected 6.8% at 0.05, 2.3% at 0.01 and 0.6% at
    0.001 (3 seeds, seed SD 3 points). Here the degrees of freedom of a test at level alpha use
    the upper (1 - q) confidence bound of MS_seed, q = SEED_BOUND * sqrt(alpha) (the variance
    itself keeps the unbiased estimate): when the seeds may dominate, the test is a t-test with
    about seeds - 1 degrees of freedom; when the examples clearly do, it is the paired t-test
    over examples. The p-value is the smallest alpha at which that test rejects (it rejects at
    every larger alpha). With one row (neither method depends on the seed, e.g. the untuned
    model against lead-3), it is the paired t-test over examples.
    """
    d = np.asarray(d, dtype=float)
    k, n = d.shape
    mean = float(d.mean())
    if n < 2:
        return untested(mean, k, n)
    if k == 1:
        combined = float(d[0].var(ddof=1))

        def degrees(alpha: float) -> float:
            return float(n - 1)
    else:
        _, ms_seed, ms_example, ms_residual = mean_squares(d)
        combined = max(ms_seed + ms_example - ms_residual, ms_residual)

        def degrees(alpha: float) -> float:
            seed_up = ms_seed * (k - 1) / float(stats.chi2.ppf(_seed_bound_q(alpha), k - 1))
            parts = [(seed_up, k - 1), (ms_example, n - 1), (-ms_residual, (k - 1) * (n - 1))]
            total = max(sum(ms for ms, _ in parts), ms_residual)
            denominator = sum(ms ** 2 / dof for ms, dof in parts)
            return max(total ** 2 / denominator, k - 1.0) if denominator > 0 else math.inf

    variance = combined / (k * n)
    alpha = 1 - level
    df = degrees(alpha)
    if variance <= 0:  # every difference is the same number
        p = 1.0 if mean == 0 else 0.0
        return Comparison(mean, mean, mean, p, df, k, n, 0.0, 0.0)
    se = math.sqrt(variance)
    t = abs(mean) / se

    def excess(log_alpha: float) -> float:  # decreasing: the test rejects where it is < 0
        p = 2 * float(stats.t.sf(t, degrees(10 ** log_alpha)))
        return math.log10(max(p, 1e-300)) - log_alpha

    if k == 1 or excess(0.0) >= 0:
        p = 2 * float(stats.t.sf(t, degrees(1.0)))
    elif excess(-LOG10_P_FLOOR) <= 0:  # rejects even there: report that test's own p-value
        p = 2 * float(stats.t.sf(t, degrees(10 ** -LOG10_P_FLOOR)))
    else:
        p = 10 ** optimize.brentq(excess, -LOG10_P_FLOOR, 0.0, xtol=1e-8)
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    detectable = (float(stats.t.ppf(1 - alpha / 2, df)) + float(stats.t.ppf(POWER, df))) * se
    return Comparison(mean, mean - half, mean + half, p, df, k, n, se, detectable)


def mean_squares(d: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, MS_seed, MS_example, MS_residual) of a seeds x examples matrix (2+ of each)."""
    k, n = d.shape
    mean = float(d.mean())
    by_seed, by_example = d.mean(axis=1), d.mean(axis=0)
    residual = d - by_seed[:, None] - by_example[None, :] + mean
    return (mean, n * float(by_seed.var(ddof=1)), k * float(by_example.var(ddof=1)),
            float((residual ** 2).sum()) / ((k - 1) * (n - 1)))


def plug_in_satterthwaite_p(d: np.ndarray) -> float:
    """The test as peftlab ran it before: Satterthwaite's degrees of freedom from the plug-in
    MS_seed (anti-conservative in the tail). Kept as the reference the simulations
    (tests/test_report_stats.py, benchmarks/test_level.py) compare the current test with."""
    k, n = d.shape
    mean, ms_seed, ms_example, ms_residual = mean_squares(d)
    combined = ms_seed + ms_example - ms_residual
    if combined <= 0:
        combined = max(ms_seed, ms_example)
    df = combined ** 2 / (ms_seed ** 2 / (k - 1) + ms_example ** 2 / (n - 1)
                          + ms_residual ** 2 / ((k - 1) * (n - 1)))
    return float(2 * stats.t.sf(abs(mean) / math.sqrt(combined / (k * n)), df))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control over many pairs); NaN
    p-values (a comparison that could not be tested) stay NaN and do not count."""
    values = np.asarray(p_values, dtype=float)
    adjusted = np.full(len(values), math.nan)
    tested = np.flatnonzero(~np.isnan(values))
    m = len(tested)
    running = 0.0
    for rank, i in enumerate(tested[np.argsort(values[tested], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * values[i]))
        adjusted[i] = running
    return adjusted.tolist()
