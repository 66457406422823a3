"""Which runs a configuration reports, which configuration a method reports, and what the
search over configurations is expected to give: every choice on validation scores only.

Two selection rules (`selection:` in the study file, `peftlab report --selection`):

- `grid`: the configuration with the best mean validation score over seeds; every seed's run
  of it is reported. The seeds that choose are the seeds reported, so a seed's luck selects
  itself: with every configuration equally good, a method searching 12 configurations
  reports a higher test mean than one searching 3 (benchmarks/selection_bias.py).
- `cross-fit` (the default): each seed's reported run is the configuration with the best mean
  validation score over the *other* seeds. A seed's luck cannot select itself, and it costs
  no extra training. With one seed there are no other seeds: grid.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import comb

from peftlab.report.stats import MIN_SEEDS, mean_ci

SELECTIONS = ("cross-fit", "grid")
DEFAULT_SELECTION = "cross-fit"


def choose(group: pd.DataFrame, options: list[str], selection: str, higher: bool) -> list[Any]:
    """Index labels of the rows of `group` (one configuration, given by the `options` columns,
    per row and seed) that are reported: per seed, see the module docstring."""
    if group.empty:
        return []
    # configurations as group numbers: a key with NaN (no rate) never equals itself
    config = group.groupby(options, dropna=False, sort=True).ngroup()
    scores = group.val_score * (1.0 if higher else -1.0)
    seeds = sorted(group.seed.dropna().unique().tolist())

    def best(rows: pd.Series) -> int | None:
        means = scores[rows].groupby(config[rows]).mean()
        return int(means.idxmax()) if means.notna().any() else None

    if selection == "grid" or len(seeds) < 2:
        top = best(pd.Series(True, index=group.index))
        return list(group.index[config == top])
    chosen = []
    for seed in seeds:
        top = best(group.seed != seed)
        chosen += list(group.index[(group.seed == seed) & (config == top)])
    return chosen


def mark_selected(runs: pd.DataFrame, selection: str) -> pd.DataFrame:
    """`selected`: per (task, label, train size), each seed's run at the rate the selection
    rule picks. Runs that need no rate (untuned, baselines) are always selected. Also
    `rates_tried` (candidates of the group) and `rate_at_edge` (the selected rate is the
    smallest or largest of two or more candidates: the best rate may lie outside the grid)."""
    runs = runs.copy()
    runs["selected"] = False
    runs["rates_tried"] = 1
    runs["rate_at_edge"] = False
    ok = runs.status.isin(["completed", "diverged"]) & runs.val_score.notna()
    no_rate = runs.learning_rate.isna()
    runs.loc[ok & no_rate, "selected"] = True
    for _, group in runs[ok & ~no_rate].groupby(["task", "label", "train_size"], dropna=False):
        rates = sorted(group.learning_rate.unique())
        runs.loc[group.index, "rates_tried"] = len(rates)
        chosen = choose(group, ["learning_rate"], selection, bool(group.higher_is_better.iloc[0]))
        runs.loc[chosen, "selected"] = True
        if len(rates) > 1:
            runs.loc[chosen, "rate_at_edge"] = group.learning_rate[chosen].isin(
                [rates[0], rates[-1]])
    return runs


def rates_text(rates: list[float]) -> str:
    """'0.001', or '0.001 (2 seeds), 0.003 (1)' where cross-fit chose per seed."""
    values = [r for r in rates if r is not None and not (isinstance(r, float) and math.isnan(r))]
    if not values:
        return "—"
    counts = pd.Series(values).value_counts(sort=False).sort_index()
    if len(counts) == 1:
        return f"{counts.index[0]:g}"
    return ", ".join(f"{r:g} ({n} seed{'s' if n > 1 else ''})" for r, n in counts.items())


def summarise(g: pd.DataFrame, label: str, configs: int) -> dict[str, Any]:
    """One reported configuration from its reported runs (one per seed): the test mean over
    the seeds whose score is finite, and what the reader needs to weigh it."""
    scores = g.test_score.to_numpy(dtype=float)
    finite = np.isfinite(scores)
    mean, std, low, high = mean_ci(scores)
    first = g.iloc[0]
    if finite.sum() < MIN_SEEDS:
        low = high = math.nan
    elif first.metric != "loss":  # every other metric is a percentage: 0 to 100
        low, high = max(low, 0.0), min(high, 100.0)
    rates = g.learning_rate.dropna().unique()
    labels = list(dict.fromkeys(g.label))
    return {
        "task": first.task, "train_size": first.train_size, "label": label,
        "method_name": first.method_name, "labels": "+".join(labels),
        "method": first.method, "size_knob": first.size_knob,
        "size_value": first.size_value if len(labels) == 1 else None,
        "lr": float(rates[0]) if len(rates) == 1 else math.nan,
        "lrs": rates_text(list(g.learning_rate)),
        "configs": int(configs), "rate_at_edge": bool(g.rate_at_edge.any()),
        # trained runs whose checkpoint chosen on validation is the untrained model
        "best_step0": int(((g.best_step == 0) & g.learning_rate.notna()).sum())
        if "best_step" in g else 0,
        "metric": first.metric, "higher_is_better": bool(first.higher_is_better),
        "seeds": int(finite.sum()), "test_mean": mean, "test_std": std, "ci_low": low,
        "ci_high": high, "val_mean": float(g.val_score.mean()),
        "trainable_params": int(g.trainable_params.fillna(0).max()),
        "trained_params": int(g.trained_params.fillna(0).max()),
        "trainable_percent": float(g.trainable_percent.fillna(0).max()),
        "wall_time_s": float(g.wall_time_s.mean()),
        "peak_memory_mb": float(g.peak_memory_mb.mean()),
        "peak_memory_kind": str(first.peak_memory_kind),
        "pack_size": int(g.pack_size.max()) if "pack_size" in g else 1,
        "diverged": int((g.status == "diverged").sum()),
        "nan_test": int((~finite & (g.status == "completed")).sum()),
        "seedless": bool(first.shared_across_sizes),
        "keys": list(g.key[finite]), "run_seeds": list(g.seed[finite]),
        "run_scores": list(scores[finite]),
    }


def headline_table(view: pd.DataFrame) -> pd.DataFrame:
    """Per (task, train size, method+size): its reported runs' test mean +- std and 95% CI."""
    rows = [summarise(g, label, int(g.rates_tried.max()))
            for (_, _, label), g in view[view.selected].groupby(
                ["task", "train_size", "label"], dropna=False)]
    return pd.DataFrame(rows)


def best_configs(view: pd.DataFrame, selection: str) -> pd.DataFrame:
    """Per (task, train size, method): the configuration (size and rate) it reports, chosen
    on validation by the same rule as the rates; its label joins the sizes that seeds chose
    (e.g. `lora-r2+lora-r8` when cross-fit chose r2 for some seeds and r8 for others)."""
    ok = view.status.isin(["completed", "diverged"]) & view.val_score.notna()
    rows = []
    for _, g in view[ok].groupby(["task", "train_size", "method_name"], dropna=False):
        options = ["label", "learning_rate"]
        chosen = g.loc[choose(g, options, selection, bool(g.higher_is_better.iloc[0]))]
        configs = len(g.groupby(options, dropna=False))
        labels = list(dict.fromkeys(chosen.label))
        rows.append(summarise(chosen, "+".join(labels), configs))
    return pd.DataFrame(rows)


def reference_methods(table: pd.DataFrame) -> tuple[str, ...]:
    """The methods whose runs trained nothing (the untuned model, the data-only baselines),
    read from the records' `trained_params`: the rows every comparison sets apart. A method
    with any run that trained is not one."""
    untrained = table.trained_params.fillna(0) == 0
    return tuple(sorted(set(table.method_name[untrained]) - set(table.method_name[~untrained])))


def top_trained(best: pd.DataFrame, references: tuple[str, ...]) -> pd.DataFrame:
    """The trained methods of one task and size, best first, ranked by validation mean (the
    test set never chooses what it then judges)."""
    trained = best[~best.method_name.isin(references) & best.val_mean.notna()
                   & best.test_mean.notna()]
    if trained.empty:
        return trained
    higher = bool(trained.higher_is_better.iloc[0])
    return trained.sort_values(["val_mean", "label"], ascending=[not higher, True])


def expected_best(view: pd.DataFrame, references: tuple[str, ...]) -> pd.DataFrame:
    """Expected best validation score after trying n configurations at random, for n = 1..N
    (Dodge et al. 2019, "Show Your Work"), and the expected test score of that choice.

    Each configuration (size x rate) is scored by its mean over seeds. The estimator is the
    unbiased one of Tang et al. (2020): draws without replacement, so the n-th value is the
    mean of the best of every n-subset, sum_i v_(i) C(i-1, n-1) / C(N, n) over the sorted
    scores (Dodge's with-replacement formula under-estimates the max for n near N).
    """
    ok = view.status.isin(["completed", "diverged"]) & view.val_score.notna() \
        & ~view.method_name.isin(references)
    rows = []
    for (task, size, name), g in view[ok].groupby(["task", "train_size", "method_name"],
                                                  dropna=False):
        higher = bool(g.higher_is_better.iloc[0])
        configs = g.groupby(["label", "learning_rate"], dropna=False).agg(
            val=("val_score", "mean"), test=("test_score", "mean")).reset_index()
        configs = configs.sort_values("val", ascending=higher, kind="stable")
        val, test = configs.val.to_numpy(), configs.test.to_numpy()
        total = len(configs)
        for n in range(1, total + 1):
            weights = np.array([comb(i - 1, n - 1, exact=True) for i in range(1, total + 1)],
                               dtype=float) / comb(total, n, exact=True)
            rows.append({"task": task, "train_size": size, "method_name": name,
                         "configurations": n, "of": total,
                         "expected_best_val": float(weights @ val),
                         "expected_test": float(weights @ test)})
    return pd.DataFrame(rows)
