"""What the selection rule does to reported scores: grid against cross-fit.

    python benchmarks/selection_bias.py --simulate
    python benchmarks/selection_bias.py STUDY_DIR [STUDY_DIR ...]

--simulate: studies in which every configuration of a method is equally good (true test
score 50 on the 0-100 scale) and each run's seed luck shows on validation and test alike (seed
SD 3 points, plus 2 points of validation/test noise per run); a method searching 12
configurations (4 sizes x 3 rates) and one searching 3, 3 seeds. Prints the bias of the
reported test mean under each rule, and, with one configuration truly better by 2 points,
how often each rule reports it and its mean regret.

STUDY_DIR: a finished study's runs read with both rules: per method, its reported test mean
under each, and how many (task, train size) cells change their best trained method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from peftlab.report import REFERENCES
from peftlab.report.load import expand_shared, load_runs, select_learning_rates
from peftlab.report.select import best_configs, choose, top_trained

RULES = ("grid", "cross-fit")


def _runs(val: np.ndarray, test: np.ndarray) -> pd.DataFrame:
    configs, seeds = val.shape
    return pd.DataFrame([{"config": c, "seed": s, "val_score": val[c, s],
                          "test_score": test[c, s]} for c in range(configs) for s in range(seeds)])


def simulate(studies: int, seed_sd: float, noise_sd: float, seeds: int, rng_seed: int) -> None:
    rng = np.random.default_rng(rng_seed)
    print(f"{studies} simulated studies, {seeds} seeds, seed SD {seed_sd}, run noise SD "
          f"{noise_sd} (0-100 scale)")
    print("configs  effect  rule       reported - truth   best reported  regret")
    for configs in (12, 3):
        for effect in (0.0, 2.0):
            truth = np.full(configs, 50.0)
            truth[0] += effect
            out = {rule: ([], [], []) for rule in RULES}
            for _ in range(studies):
                luck = rng.normal(0, seed_sd, (configs, seeds))
                val = truth[:, None] + luck + rng.normal(0, noise_sd, (configs, seeds))
                test = truth[:, None] + luck + rng.normal(0, noise_sd, (configs, seeds))
                runs = _runs(val, test)
                for rule in RULES:
                    chosen = runs.loc[choose(runs, ["config"], rule, higher=True)]
                    bias, best, regret = out[rule]
                    bias.append(chosen.test_score.mean() - truth[chosen.config].mean())
                    best.append(np.mean(chosen.config == 0))
                    regret.append(truth.max() - truth[chosen.config].mean())
            for rule, (bias, best, regret) in out.items():
                print(f"{configs:7d}  {effect:6.1f}  {rule:9s}  {np.mean(bias):+16.2f}   "
                      f"{np.mean(best):13.2f}  {np.mean(regret):6.2f}")


def compare_study(study_dir: Path) -> None:
    loaded, _ = load_runs(study_dir)
    best = {}
    for rule in RULES:
        view = expand_shared(select_learning_rates(loaded, rule))
        best[rule] = best_configs(view, rule).set_index(["task", "train_size", "method_name"])
    a, b = best["grid"], best["cross-fit"]
    joined = a[["configs", "test_mean"]].join(b[["test_mean"]].rename(
        columns={"test_mean": "test_mean_cross_fit"}))
    joined = joined[~joined.index.get_level_values("method_name").isin(REFERENCES)]
    joined["change"] = joined.test_mean_cross_fit - joined.test_mean
    print(f"{study_dir}: reported test mean, cross-fit minus grid (points, 0-100)")
    for configs, g in joined.groupby("configs"):
        print(f"  methods searching {configs:2d} configurations: mean {g.change.mean():+.2f}, "
              f"range [{g.change.min():+.2f}, {g.change.max():+.2f}] over {len(g)} cells")
    changed = cells = 0
    for key, g in a.reset_index().groupby(["task", "train_size"]):
        other = b.reset_index()
        other = other[(other.task == key[0]) & (other.train_size == key[1])]
        first, second = top_trained(g, REFERENCES), top_trained(other, REFERENCES)
        if len(first) and len(second):
            cells += 1
            changed += first.iloc[0].method_name != second.iloc[0].method_name
    print(f"  best trained method differs in {changed} of {cells} (task, train size) cells")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", type=Path)
    parser.add_argument("--simulate", action="store_true")
    parser.add_argument("--sims", type=int, default=1000)
    args = parser.parse_args()
    if args.simulate:
        simulate(args.sims, seed_sd=3.0, noise_sd=2.0, seeds=3, rng_seed=0)
    for study in args.studies:
        compare_study(study)


if __name__ == "__main__":
    main()
