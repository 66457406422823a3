"""Confidence intervals over seeds and the paired bootstrap over test examples."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, std, ci_low, ci_high) with a Student-t interval over seeds (NaN CI for one seed)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
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
class BootstrapResult:
    difference: float  # mean(a) - mean(b)
    ci_low: float
    ci_high: float
    p_value: float  # two-sided, H0: no difference


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> BootstrapResult:
    """Resample test examples with replacement, the same examples for both systems.

    CI: percentile interval of the resampled mean differences. p-value: the share of
    resampled differences, centred on the observed one (the null shifted to zero), that are
    at least as far from zero as the observed difference (Efron & Tibshirani 1993, 16.4).
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    observed = float(d.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(n, 1))  # bounded memory for large test sets
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    alpha = 1 - level
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    if np.allclose(d, d[0]):
        p = 1.0 if observed == 0 else 0.0
    else:
        p = float(np.mean(np.abs(means - observed) >= abs(observed) - 1e-12))
    return BootstrapResult(observed, float(low), float(high), p)


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control over many pairs)."""
    m = len(p_values)
    order = np.argsort(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()
