"""Report logic on hand-made run folders with known numbers, and statistics against scipy."""


import numpy as np
import pytest
from scipy import stats

from peftlab.files import write_json, write_jsonl
from peftlab.report import write_report
from peftlab.report.figures import pareto_front
from peftlab.report.load import load_runs, select_learning_rates
from peftlab.report.stats import crossed_test, holm, mean_ci

N_EXAMPLES = 20


def correct(k: int) -> list[float]:
    """Per-example accuracy scores (0 or 100) with k of N_EXAMPLES right."""
    return [100.0] * k + [0.0] * (N_EXAMPLES - k)


def make_run(study, key, *, method, label, lr, seed, val, per_example, size=64, curve=None,
             params=100, trained=None, shared=False, status="completed", task="sst2",
             metric="accuracy", memory_kind="rss_run", pack=None):
    """A finished run folder whose test metric is the mean of its per-example scores."""
    folder = study / key
    test = sum(per_example) / len(per_example) if per_example else float("nan")
    write_json(folder / "study_cell.json", {
        "task": task, "method": method, "label": label, "method_name": method,
        "size_knob": None, "size_value": None, "train_size": size, "learning_rate": lr,
        "seed": seed, "shared_across_sizes": shared})
    write_json(folder / "summary.json", {
        "status": status, "method": method, "task": task, "train_size": size, "seed": seed,
        "learning_rate": lr, "trainable_params": params,
        "trained_params": params if trained is None else trained,
        "total_params": 1000 + params, "trainable_percent": 100 * params / (1000 + params),
        "best_step": 10, "selection_metric": metric, "val_metrics": {metric: val, "loss": 1.0},
        "test_metrics": {metric: test, "loss": 1.0}, "wall_time_s": 2.0,
        "peak_memory_mb": 10.0, "peak_memory_kind": memory_kind,
        **({"pack": pack} if pack else {})})
    write_jsonl(folder / "metrics.jsonl", curve or [
        {"step": 0, "train_loss": None, f"val_{metric}": 50.0},
        {"step": 10, "train_loss": 1.0, f"val_{metric}": val}])
    write_jsonl(folder / "predictions" / "test.jsonl", [
        {"id": str(i), "reference": "positive", "prediction": "positive", "score": s,
         "scores": {metric: s}} for i, s in enumerate(per_example)])


@pytest.fixture
def study(tmp_path):
    # lora: lr 1e-3 has the better mean validation score (80 vs 70) but the WORSE test score:
    # selection must follow validation, never test.
    for seed in (0, 1, 2):
        make_run(tmp_path, f"sst2/lora/n64/lr0.001/seed{seed}", method="lora", label="lora",
                 lr=1e-3, seed=seed, val=80 + seed, per_example=correct(12 + seed))
        make_run(tmp_path, f"sst2/lora/n64/lr0.01/seed{seed}", method="lora", label="lora",
                 lr=1e-2, seed=seed, val=70 + seed, per_example=correct(18))
        make_run(tmp_path, f"sst2/prompt/n64/lr0.3/seed{seed}", method="prompt", label="prompt",
                 lr=0.3, seed=seed, val=55, per_example=correct(10 + seed), params=10,
                 curve=[{"step": 0, "train_loss": None, "val_accuracy": 60.0},
                        {"step": 5, "train_loss": 2.0, "val_accuracy": 58.0},
                        {"step": 10, "train_loss": 1.0, "val_accuracy": 55.0}])
    make_run(tmp_path, "sst2/untuned", method="untuned", label="untuned", lr=None, seed=0,
             val=50, per_example=correct(10), params=0, shared=True,
             curve=[{"step": 0, "val_accuracy": 50.0}])
    return tmp_path


def test_learning_rate_is_chosen_on_validation_not_test(study):
    runs = select_learning_rates(load_runs(study)[0])
    lora = runs[runs.label == "lora"]
    assert set(lora[lora.selected].learning_rate) == {1e-3}
    assert runs[runs.label == "untuned"].selected.all()


def test_report_tables_figures_and_findings(study):
    paths = write_report(study)
    import pandas as pd

    headline = pd.read_csv(paths["headline"])
    lora = headline[headline.label == "lora"].iloc[0]
    assert lora.lr == 1e-3 and lora.test_mean == pytest.approx(65.0)
    assert lora.test_std == pytest.approx(5.0) and lora.seeds == 3
    half = stats.t.ppf(0.975, 2) * 5.0 / np.sqrt(3)
    assert (lora.ci_low, lora.ci_high) == pytest.approx((65 - half, min(65 + half, 100)))
    assert set(headline.label) == {"lora", "prompt", "untuned"}
    runs = pd.read_csv(paths["runs"])
    assert len(runs) == 10 and runs.selected.sum() == 7  # appendix keeps every run
    flagged = runs[runs.flag_loss_fell_metric_fell]
    assert set(flagged.label) == {"prompt"}  # loss fell 2 -> 1 while accuracy fell 60 -> 55
    md = paths["markdown"].read_text()
    assert "the best trained method on test accuracy (%) is lora, 65.0 ± 5.0 over 3 seeds" in md
    assert "3 of 10 runs ended with a validation metric below their untrained" in md
    assert "published study" not in md
    sig = pd.read_csv(paths["significance"])
    pair = sig[(sig.a == "prompt") & (sig.b == "lora")].iloc[0]
    assert pair.difference == pytest.approx(55.0 - 65.0)  # 0-100, as the tables
    assert pair.shown and pair.b_role == "best"
    for name in ("curves-sst2-n64", "efficiency-sst2-n64", "scaling-sst2"):
        assert (paths["figures"] / f"{name}.png").stat().st_size > 5000
        assert (paths["figures"] / f"{name}.svg").stat().st_size > 5000
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table" in html


def test_failed_runs_are_listed_not_fatal(study):
    folder = study / "sst2/lora/n64/lr0.1/seed0"
    write_json(folder / "summary.json", {"status": "failed", "method": "lora", "task": "sst2",
                                         "error": "RuntimeError: boom"})
    paths = write_report(study)
    assert "1 runs failed: sst2/lora/n64/lr0.1/seed0" in paths["markdown"].read_text()


def test_holm_and_mean_ci():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    mean, std, low, high = mean_ci(np.array([1.0, 2.0, 3.0]))
    assert (mean, std) == (2.0, 1.0)
    assert high - mean == pytest.approx(stats.t.ppf(0.975, 2) / np.sqrt(3))
    assert np.isnan(mean_ci(np.array([5.0]))[2])


def test_pareto_front():
    points = [(10, 50.0), (100, 60.0), (1000, 55.0), (5, 40.0), (100, 58.0)]
    assert sorted(pareto_front(points, higher=True)) == [0, 1, 3]


def test_report_without_runs_is_a_clear_error(tmp_path):
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="no finished runs"):
        write_report(tmp_path)


def test_grid_json_names_missing_runs_and_leaves_out_runs_it_does_not_have(study):
    keys = [str(p.parent.relative_to(study)) for p in study.rglob("summary.json")]
    grid = [k for k in keys if "lr0.01/" not in k] + ["sst2/lora/n64/lr0.001/seed9"]
    write_json(study / "grid.json", [{"key": k} for k in grid])
    md = write_report(study)["markdown"].read_text()
    assert "1 runs of the grid have no result yet" in md
    # runs of an earlier version of the study (here lr 0.01) are not reported, and said so
    assert "3 run folders left out: sst2/lora/n64/lr0.01/seed0: not in the study's grid" in md
    assert "lr0.01/seed0 | completed" not in md


def test_a_study_whose_runs_all_failed_gets_a_clear_error(tmp_path):
    from peftlab.errors import PeftlabError

    write_json(tmp_path / "sst2/lora/seed0/summary.json", {
        "status": "failed", "method": "lora", "task": "sst2", "error": "DataError: no file"})
    with pytest.raises(PeftlabError, match=r"no completed run to report on \(1 failed\); "
                                           r"first error: DataError: no file"):
        write_report(tmp_path)


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


@pytest.mark.parametrize("seed_sd,logit_sd", [(0.6, 0.01), (1.2, 0.055), (3.0, 0.16)])
def test_two_equal_methods_are_called_different_about_5_percent_of_the_time(seed_sd, logit_sd):
    """The issue's null: 872 examples, 3 seeds, seed-to-seed accuracy SDs of 0.6/1.2/3.0
    points. Bootstrapping examples of seed-averaged scores (the old test) rejected far too
    often once seeds vary; the crossed test stays near 0.05."""
    rng = np.random.default_rng(2026)
    rejected, rejected_old, sds = 0, 0, []
    sims = 600
    for _ in range(sims):
        a, b = simulate_null(rng, logit_sd)
        sds.append(a.mean(axis=1).std(ddof=1))
        rejected += crossed_test(a - b).p_value < 0.05
        # the old test: a paired t over examples of seed-averaged scores (the bootstrap's
        # large-sample equivalent, without its 10,000 resamples per simulated study)
        rejected_old += stats.ttest_rel(a.mean(0), b.mean(0)).pvalue < 0.05
    assert np.sqrt(np.mean(np.square(sds))) == pytest.approx(seed_sd, abs=0.25)
    assert 0.02 <= rejected / sims <= 0.08
    if seed_sd == 3.0:
        assert rejected_old / sims > 0.15  # the bug this test would have caught


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


# --- what the report says, and how ---------------------------------------------------------

def reference_study(tmp_path):
    """lora and full trained, an untuned model and a majority baseline that beats them all."""
    for seed in (0, 1, 2):
        make_run(tmp_path, f"sst2/lora/n64/lr0.0003/seed{seed}", method="lora", label="lora",
                 lr=3e-4, seed=seed, val=60, per_example=correct(11 + seed))
        make_run(tmp_path, f"sst2/full/n64/lr0.0001/seed{seed}", method="full", label="full",
                 lr=1e-4, seed=seed, val=55, per_example=correct(10), params=1000)
        make_run(tmp_path, f"sst2/majority/n64/seed{seed}", method="majority",
                 label="majority", lr=None, seed=seed, val=70, per_example=correct(20),
                 params=0)
    make_run(tmp_path, "sst2/untuned", method="untuned", label="untuned", lr=None, seed=0,
             val=50, per_example=correct(4), params=0, shared=True)
    return tmp_path


def test_findings_place_the_best_method_against_the_baselines(tmp_path):
    import pandas as pd

    paths = write_report(reference_study(tmp_path))
    md = paths["markdown"].read_text()
    findings = md.split("## Findings")[1].split("\n## ")[0]
    assert "the best trained method on test accuracy (%) is lora, 60.0 ± 5.0 over 3 seeds" in findings
    assert "majority (100.0): -40.0" in findings
    assert "is not shown to be better than majority here" in findings
    assert "untuned (20.0): +40.0" in findings and "significantly higher" in findings
    # the significance table: each method against best, full, untuned; the CSV every pair
    sig = pd.read_csv(paths["significance"])
    shown = sig[sig.shown]
    assert {frozenset(p) for p in zip(shown.a, shown.b)} == {
        frozenset(p) for p in (("full", "lora"), ("majority", "lora"), ("untuned", "lora"),
                               ("majority", "full"), ("untuned", "full"), ("majority", "untuned"))}
    assert len(sig) == len(shown) == 6  # every unordered pair once; here each is shown
    majority = shown[(shown.a == "majority") & (shown.b == "lora")].iloc[0]
    assert majority.b_role == "best" and majority.difference == pytest.approx(40.0)
    assert shown.p_holm.notna().all() and sig.p_holm_all_pairs.notna().all()
    assert "### sst2: differences between methods" in md
    table = md.split("### sst2: differences between methods")[1]
    assert "| n | method | test | vs best (lora) | vs full | vs untuned |" in table


def test_seed_counts_intervals_and_the_appendix_are_honest(tmp_path):
    import pandas as pd

    study = reference_study(tmp_path)
    # one lora seed diverged before any finite score: it counts no seed
    make_run(study, "sst2/lora/n64/lr0.0003/seed2", method="lora", label="lora", lr=3e-4,
             seed=2, val=60, per_example=[], status="diverged")
    paths = write_report(study)
    headline = pd.read_csv(paths["headline"])
    lora = headline[headline.label == "lora"].iloc[0]
    assert lora.seeds == 2 and np.isnan(lora.ci_low)  # no t-interval from 2 seeds
    full = headline[headline.label == "full"].iloc[0]
    assert full.seeds == 3 and 0 <= full.ci_low <= full.ci_high <= 100
    md = paths["markdown"].read_text()
    assert "57.5 ± 3.5 (2 seeds) lr 0.0003" in md
    appendix = md.split("## Appendix: every run")[1]
    assert "| sst2/untuned | completed | True | — | 0 |" in appendix
    assert "| 0.0003 |" in appendix and "| nan |" not in appendix and "| 0.0 |" not in appendix


def test_per_example_scores_on_another_scale_are_refused_naming_the_file(tmp_path):
    from peftlab.errors import PeftlabError

    study = reference_study(tmp_path)
    path = study / "sst2/full/n64/lr0.0001/seed0/predictions/test.jsonl"
    write_jsonl(path, [{"id": str(i), "score": s / 100} for i, s in enumerate(correct(10))])
    with pytest.raises(PeftlabError, match=r"seed0/predictions/test.jsonl: the per-example "
                                           r"accuracy scores average 0.5, but summary.json "
                                           r"reports test accuracy 50"):
        write_report(study)


def test_a_method_keeps_its_colour_in_every_figure(tmp_path):
    """Colours come from the study's methods, not each figure's: prompt is drawn in the same
    colour on a task where lora is missing."""
    from peftlab.report.figures import method_colors

    for seed in (0, 1):
        for task in ("sst2", "other"):
            make_run(tmp_path, f"{task}/prompt/n64/lr0.3/seed{seed}", method="prompt",
                     label="prompt", lr=0.3, seed=seed, val=55, per_example=correct(10 + seed),
                     task=task)
        make_run(tmp_path, f"sst2/lora/n64/lr0.001/seed{seed}", method="lora", label="lora",
                 lr=1e-3, seed=seed, val=60, per_example=correct(12), task="sst2")
    paths = write_report(tmp_path)
    colors = method_colors(["lora", "prompt"])
    assert colors["prompt"] != method_colors(["prompt"])["prompt"]  # what per-figure gave
    for name in ("scaling-other", "scaling-sst2", "efficiency-other-n64"):
        assert colors["prompt"] in (paths["figures"] / f"{name}.svg").read_text(), name


def test_legends_sit_outside_the_axes():
    import matplotlib.pyplot as plt

    from peftlab.report.figures import _legend_outside

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="a line")
    _legend_outside(ax)
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1
    plt.close(fig)


def test_packed_runs_memory_is_marked_as_their_packs_and_a_changing_best_is_marked(tmp_path):
    """A packed run's memory is its pack's (one process held it); when the best trained
    method differs between training-set sizes, each size's best row says so."""
    for seed in (0, 1):
        for size, lora_right in ((16, 12), (64, 8)):
            make_run(tmp_path, f"sst2/lora/n{size}/lr0.001/seed{seed}", method="lora",
                     label="lora", lr=1e-3, seed=seed, val=60, per_example=correct(lora_right),
                     size=size, pack={"id": f"p{size}", "size": 2, "index": seed,
                                      "wall_time_s": 4.0})
            make_run(tmp_path, f"sst2/full/n{size}/lr0.0001/seed{seed}", method="full",
                     label="full", lr=1e-4, seed=seed, val=55, per_example=correct(10),
                     size=size, params=1000)
    md = write_report(tmp_path)["markdown"].read_text()
    assert "peak RSS MB (this run, or its pack) |" in md
    assert "| 10 (pack of 2) |" in md  # lora's row
    table = md.split("differences between methods")[1]
    assert "| n | method | test | vs best trained of its n | vs full | vs untuned |" in table
    assert "| 16 | lora |" in table and "— (best)" in table
