"""The statistics behind the report's claims: the crossed test's level (simulated studies),
its reductions to known tests, Holm, the expected best score of a search, and selection."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from peftlab.report.select import choose, expected_best
from peftlab.report.stats import (
    MIN_SEEDS,
    crossed_test,
    holm,
    mean_ci,
    plug_in_satterthwaite_p,
)

LEVELS = (0.05, 0.01, 0.001)
SEED_SDS = [(0.6, 0.01), (1.2, 0.055), (3.0, 0.16)]  # accuracy SD over seeds, its logit SD


def test_holm_and_mean_ci():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    mean, std, low, high = mean_ci(np.array([1.0, 2.0, 3.0]))
    assert (mean, std) == (2.0, 1.0)
    assert high - mean == pytest.approx(stats.t.ppf(0.975, 2) / np.sqrt(3))
    assert np.isnan(mean_ci(np.array([5.0]))[2])


# --- the test between methods carries seed and example variance (simulated studies) --------

def simulate_null(rng, seed_sd_logit: float, n=872, seeds=3):
    """Two equally good methods (per-example 0/100 scores, seeds x examples): each is right on
    its own examples (a method effect per example, drawn afresh for each method, so neither is
    better on average), and each seed shifts a method's accuracy (the seed-to-seed SD)."""
    difficulty = rng.normal(1.0, 1.0, n)
    out = []
    for _ in range(2):
        per_example = rng.normal(0.0, 1.5, n)
        per_seed = rng.normal(0.0, seed_sd_logit, seeds)
        z = difficulty + per_example + per_seed[:, None] + rng.normal(0.0, 0.2, (seeds, n))
        out.append(100.0 * (z > 0))
    return out


def test_crossed_test_reduces_to_known_tests():
    rng = np.random.default_rng(5)
    # one row (neither side depends on the seed): the paired t-test over examples
    d = rng.normal(0.3, 2.0, (1, 200))
    ours = crossed_test(d)
    ref = stats.ttest_1samp(d[0], 0.0)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9) and ours.df == 199
    # seed effects only (each example differs by the same amount within a seed): the
    # t-test over the seeds' mean differences, 2 degrees of freedom
    d = rng.normal(0.5, 1.0, (3, 1))[:, [0] * 50] + rng.normal(0, 1e-6, (3, 50))
    ours = crossed_test(d)
    ref = stats.ttest_1samp(d.mean(1), 0.0)
    assert ours.df == pytest.approx(2, abs=0.01)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-3)
    assert ours.ci_low < d.mean() < ours.ci_high
    identical = crossed_test(np.zeros((3, 10)))
    assert identical.difference == 0 and identical.p_value == 1.0
    assert np.isnan(holm([0.01, float("nan")])[1]) and holm([0.01, float("nan")])[0] == 0.01




def simulate_studies(rng, seed_sd_logit: float, sims: int, methods=2, n=872, seeds=3,
                     n_val=0):
    """`sims` studies of equally good methods, as simulate_null (0/100 scores, seeds x
    examples); with n_val, also validation scores that share each run's seed effect (a lucky
    seed is lucky on validation and test alike). Returns (test, val): sims x methods x seeds
    x examples."""
    def split(size, seed_effect):
        difficulty = rng.normal(1.0, 1.0, (sims, 1, 1, size))
        per_example = rng.normal(0.0, 1.5, (sims, methods, 1, size))
        noise = rng.normal(0.0, 0.2, (sims, methods, seeds, size))
        return 100.0 * (difficulty + per_example + seed_effect + noise > 0)

    seed_effect = rng.normal(0.0, seed_sd_logit, (sims, methods, seeds, 1))
    return split(n, seed_effect), (split(n_val, seed_effect) if n_val else None)


def rejection_rates(seed_sd_logit: float, sims: int, rng_seed: int):
    rng = np.random.default_rng(rng_seed)
    test, _ = simulate_studies(rng, seed_sd_logit, sims)
    d = test[:, 0] - test[:, 1]
    ours = np.array([crossed_test(x).p_value for x in d])
    return ours, d


@pytest.mark.parametrize("seed_sd,logit_sd", SEED_SDS)
def test_the_crossed_test_holds_its_level_at_005_and_001(seed_sd, logit_sd):
    """2,000 simulated null studies per seed SD (872 examples, 3 seeds, 0/100 scores): the
    rejection rate stays at or below each level, with two Monte Carlo standard errors of
    room; the plug-in Satterthwaite test it replaces broke the 0.01 level once seeds vary."""
    sims = 2000
    p, d = rejection_rates(logit_sd, sims, rng_seed=2026)
    for level in (0.05, 0.01):
        room = 2 * math.sqrt(level * (1 - level) / sims)
        assert np.mean(p < level) <= level + room, level
    assert np.mean(p < 0.05) >= 0.02  # still a test (not one that never rejects)
    if seed_sd == 3.0:
        old = np.array([plug_in_satterthwaite_p(x) for x in d])
        assert np.mean(old < 0.01) > 0.01 + 2 * math.sqrt(0.01 * 0.99 / sims)


@pytest.mark.slow  # 36,000 simulated studies
@pytest.mark.parametrize("seed_sd,logit_sd", SEED_SDS)
def test_the_crossed_test_holds_its_level_at_0001(seed_sd, logit_sd):
    sims = 12_000
    p, _ = rejection_rates(logit_sd, sims, rng_seed=7)
    assert np.mean(p < 0.001) <= 0.001 + 3 * math.sqrt(0.001 / sims)


@pytest.mark.slow  # 3 x 1,000 studies of 6 methods
@pytest.mark.parametrize("seed_sd,logit_sd", SEED_SDS)
def test_six_equal_methods_are_rarely_called_different_in_the_reports_family(seed_sd, logit_sd):
    """The report's own family: 6 equally good methods, the best chosen on validation
    (which shares each run's seed luck with test), each method against the best and against
    full fine-tuning, Holm-adjusted: the chance that any pair is called significant <= 0.06."""
    rng = np.random.default_rng(11)
    studies, hits = 1000, 0
    test, val = simulate_studies(rng, logit_sd, studies, methods=6, n_val=200)
    for t, v in zip(test, val):
        best, full = int(np.argmax(v.mean(axis=(1, 2)))), 0
        pairs = {(m, best) for m in range(6) if m != best}
        pairs |= {(m, full) for m in range(6) if m not in (best, full)}
        hits += any(p < 0.05 for p in holm([crossed_test(t[a] - t[b]).p_value for a, b in pairs]))
    assert hits / studies <= 0.06


def test_a_variance_estimate_below_zero_is_bounded_by_the_residual():
    """Pure interaction (every seed and example mean equal): MS_seed = MS_example = 0, so
    the combined mean square is negative. The variance of the mean is at least
    MS_residual / (seeds x examples); it was 0 ('every difference is the same number')."""
    k, n = 3, 40
    d = np.array([[(-1.0) ** (s + j) for j in range(n)] for s in range(k)]) + 0.2
    d[:, :] -= d.mean(axis=0) - 0.2  # example means all 0.2, seed means all 0.2
    residual = d - d.mean(1)[:, None] - d.mean(0)[None, :] + d.mean()
    ms_res = (residual ** 2).sum() / ((k - 1) * (n - 1))
    c = crossed_test(d)
    assert ms_res > 0 and c.se == pytest.approx(math.sqrt(ms_res / (k * n)))
    assert 0 < c.p_value < 1 and c.ci_low < 0.2 < c.ci_high


def test_the_smallest_detectable_difference_is_detected_at_its_power():
    """A true difference equal to a comparison's `detectable` is found in about 80% of
    studies like it (normal differences whose variance the test examples dominate, as on a
    real test set; no seed effect)."""
    rng = np.random.default_rng(3)

    def study(shift: float) -> np.ndarray:
        return shift + rng.normal(0.0, 10.0, 400)[None, :] + rng.normal(0.0, 2.0, (MIN_SEEDS, 400))

    detectable = np.median([crossed_test(study(0.0)).detectable for _ in range(50)])
    found = np.mean([crossed_test(study(detectable)).p_value < 0.05 for _ in range(400)])
    assert 0.72 <= found <= 0.88


def test_expected_best_is_the_mean_best_of_every_subset():
    """Tang et al.'s estimator equals the average, over every n-subset of the N
    configurations, of the subset's best validation score, and the test score of that best."""
    rng = np.random.default_rng(0)
    val, test = rng.normal(50, 5, 6), rng.normal(50, 5, 6)
    runs = pd.DataFrame({"task": "t", "train_size": 16, "method_name": "lora",
                         "label": [f"lora-r{i}" for i in range(6)], "learning_rate": 1e-3,
                         "seed": 0, "status": "completed", "val_score": val, "test_score": test,
                         "higher_is_better": True})
    table = expected_best(runs, references=())
    for n in range(1, 7):
        subsets = list(itertools.combinations(range(6), n))
        best = [max(s, key=lambda i: val[i]) for s in subsets]
        row = table[table.configurations == n].iloc[0]
        assert row.expected_best_val == pytest.approx(np.mean(val[best]))
        assert row.expected_test == pytest.approx(np.mean(test[best]))
        assert row["of"] == 6


def _configs(val: np.ndarray, test: np.ndarray | None = None) -> pd.DataFrame:
    """Runs of configurations x seeds with the given validation (and test) scores."""
    k, s = val.shape
    return pd.DataFrame([{"config": c, "seed": seed, "val_score": val[c, seed],
                          "test_score": (test if test is not None else val)[c, seed]}
                         for c in range(k) for seed in range(s)])


def test_cross_fit_chooses_each_seeds_run_on_the_other_seeds():
    # config 0 is best on seeds 1 and 2; seed 0 alone makes config 1 best on the mean
    val = np.array([[50.0, 70.0, 70.0], [100.0, 60.0, 60.0]])
    runs = _configs(val)
    grid = runs.loc[choose(runs, ["config"], "grid", higher=True)]
    assert set(grid.config) == {1} and len(grid) == 3
    cross = runs.loc[choose(runs, ["config"], "cross-fit", higher=True)].set_index("seed")
    # seed 0 by seeds 1, 2 -> config 0; seed 1 by seeds 0, 2: 60 vs 80 -> config 1; likewise 2
    assert cross.config.to_dict() == {0: 0, 1: 1, 2: 1}
    lower = runs.loc[choose(runs, ["config"], "cross-fit", higher=False)].set_index("seed")
    assert lower.config.to_dict() == {0: 1, 1: 0, 2: 0}  # a loss: lower is better
    one_seed = runs[runs.seed == 0]
    assert list(one_seed.loc[choose(one_seed, ["config"], "cross-fit", True)].config) == [1]


def test_cross_fit_removes_the_selection_bias_of_a_larger_search():
    """Every configuration equally good; a seed's luck (SD 3 points) shows on validation and
    test alike. Grid selection over 12 configurations reports a test mean well above the
    truth (50); cross-fit selection's is unbiased."""
    rng = np.random.default_rng(5)
    reported = {"grid": [], "cross-fit": []}
    for _ in range(300):
        luck = rng.normal(0, 3, (12, 3))
        val = 50 + luck + rng.normal(0, 2, (12, 3))
        test = 50 + luck + rng.normal(0, 2, (12, 3))
        runs = _configs(val, test)
        for rule in reported:
            reported[rule].append(runs.loc[choose(runs, ["config"], rule, True)].test_score.mean())
    bias = {rule: np.mean(v) - 50 for rule, v in reported.items()}
    assert bias["grid"] > 1.5
    assert abs(bias["cross-fit"]) < 0.4
