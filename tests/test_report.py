"""Report logic on hand-made run folders with known numbers, and statistics against scipy."""


import numpy as np
import pytest
from scipy import stats

from peftlab.files import write_json, write_jsonl
from peftlab.report import write_report
from peftlab.report.figures import pareto_front
from peftlab.report.load import load_runs, select_learning_rates

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
        "status": status, "method": method, "task": task, "model": "t5-tiny",
        "train_size": size, "seed": seed,
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
    assert ("the best trained method, chosen by its validation score, is lora: test accuracy (%) "
            "65.0 ± 5.0 over 3 seeds (its learning rate (0.001, of 2) chosen for each seed on "
            "the other seeds' validation (cross-fit))") in md
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
    assert (paths["figures"] / "search-sst2-n64.png").stat().st_size > 5000
    assert html.count("data:image/png;base64,") == 4 and "<table" in html


def test_failed_runs_are_listed_not_fatal(study):
    folder = study / "sst2/lora/n64/lr0.1/seed0"
    write_json(folder / "summary.json", {"status": "failed", "method": "lora", "task": "sst2",
                                         "error": "RuntimeError: boom"})
    paths = write_report(study)
    assert "1 runs failed: sst2/lora/n64/lr0.1/seed0" in paths["markdown"].read_text()


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
    assert ("the best trained method, chosen by its validation score, is lora: test accuracy (%) "
            "60.0 ± 5.0 over 3 seeds (one configuration, learning rate 0.0003: nothing chosen)"
            ) in findings
    assert "majority (100.0): -40.0" in findings
    assert "is not shown to be better than majority here" in findings
    assert "untuned (20.0): +40.0" in findings and "significantly higher" in findings
    # the significance table: each method against best, full, untuned; the CSV every pair
    sig = pd.read_csv(paths["significance"])
    shown = sig[sig.shown]
    assert {frozenset(p) for p in zip(shown.a, shown.b)} == {
        frozenset(p) for p in (("full", "lora"), ("majority", "lora"), ("untuned", "lora"),
                               ("majority", "full"), ("untuned", "full"), ("majority", "untuned"))}
    # the shown family (methods' reported configurations) and every pair of configurations
    assert len(shown) == 6 and len(sig) == 12 and sig[~sig.shown].p_holm.isna().all()
    assert {frozenset(p) for p in zip(shown.a, shown.b)} == {
        frozenset(p) for p in zip(sig[~sig.shown].a, sig[~sig.shown].b)}
    majority = shown[(shown.a == "majority") & (shown.b == "lora")].iloc[0]
    assert majority.b_role == "best" and majority.difference == pytest.approx(40.0)
    assert shown.p_holm.notna().all() and sig[~sig.shown].p_holm_all_pairs.notna().all()
    assert "### sst2: differences between methods" in md
    table = md.split("### sst2: differences between methods")[1]
    assert "| n | method | configs searched | test | vs best (lora) | vs full | vs untuned |" in table


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
        for size, lora_right, lora_val in ((16, 12, 60), (64, 8, 50)):
            make_run(tmp_path, f"sst2/lora/n{size}/lr0.001/seed{seed}", method="lora",
                     label="lora", lr=1e-3, seed=seed, val=lora_val,
                     per_example=correct(lora_right),
                     size=size, pack={"id": f"p{size}", "size": 2, "index": seed,
                                      "wall_time_s": 4.0})
            make_run(tmp_path, f"sst2/full/n{size}/lr0.0001/seed{seed}", method="full",
                     label="full", lr=1e-4, seed=seed, val=55, per_example=correct(10),
                     size=size, params=1000)
    md = write_report(tmp_path)["markdown"].read_text()
    assert "peak RSS MB (this run, or its pack) |" in md
    assert "| 10 (pack of 2) |" in md  # lora's row
    table = md.split("differences between methods")[1]
    assert ("| n | method | configs searched | test | vs best trained of its n | vs full | "
            "vs untuned |") in table
    assert "| 16 | lora |" in table and "— (best)" in table


# --- claims at the level they are stated --------------------------------------------------

def test_the_best_method_is_the_validation_winner_even_when_test_ranks_otherwise(tmp_path):
    """lora wins on validation, prompt on test: the report's best (and the reference every
    method is tested against) is lora; the runner-up is prompt, also by validation."""
    for seed in (0, 1, 2):
        make_run(tmp_path, f"sst2/lora/n64/lr0.001/seed{seed}", method="lora", label="lora",
                 lr=1e-3, seed=seed, val=80, per_example=correct(10 + seed))
        make_run(tmp_path, f"sst2/prompt/n64/lr0.3/seed{seed}", method="prompt",
                 label="prompt", lr=0.3, seed=seed, val=60, per_example=correct(16 + seed))
    import pandas as pd

    paths = write_report(tmp_path)
    md = paths["markdown"].read_text()
    assert "the best trained method, chosen by its validation score, is lora" in md
    assert "Runner-up by validation prompt (85.0) against lora" in md
    sig = pd.read_csv(paths["significance"])
    shown = sig[sig.shown]
    assert list(shown.b) == ["lora"] and list(shown.b_role) == ["best"]


def test_below_three_seeds_nothing_is_tested_and_no_interval_is_printed(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, f"sst2/lora/n64/lr0.001/seed{seed}", method="lora", label="lora",
                 lr=1e-3, seed=seed, val=80, per_example=correct(20))
        make_run(tmp_path, f"sst2/full/n64/lr0.0001/seed{seed}", method="full", label="full",
                 lr=1e-4, seed=seed, val=60, per_example=correct(2))
    import pandas as pd

    paths = write_report(tmp_path)
    sig = pd.read_csv(paths["significance"])
    assert sig.p_value.isna().all() and sig.ci_low.isna().all()
    assert sig.difference.notna().all()  # the difference is still given
    md = paths["markdown"].read_text()
    assert "full (10.0): +90.0, not tested (2 seeds)" not in md  # full is not a reference
    table = md.split("differences between methods")[1].split("## Appendix")[0]
    assert "+90.0, not tested: 2 seeds" in table and "[" not in table.split("|---|")[-1]
    assert "significant" not in md.split("## Findings")[1].split("## ")[0].replace(
        "not significant", "")


def test_the_reader_is_told_what_the_numbers_rest_on(tmp_path):
    """The test split's origin, what the model is, the interval's scope, rates at the edge
    of their grid, step-0 checkpoints, configurations searched and the detectable difference."""
    import pandas as pd

    for seed in (0, 1, 2):
        for lr, val in ((1e-3, 80), (1e-2, 70)):
            make_run(tmp_path, f"sst2/lora/n64/lr{lr:g}/seed{seed}", method="lora",
                     label="lora", lr=lr, seed=seed, val=val + seed, per_example=correct(12))
        for lr, val in ((1e-4, 50), (3e-4, 60), (1e-3, 55)):  # the middle rate wins
            make_run(tmp_path, f"sst2/full/n64/lr{lr:g}/seed{seed}", method="full",
                     label="full", lr=lr, seed=seed, val=val, per_example=correct(10 + seed))
    paths = write_report(tmp_path)
    md = paths["markdown"].read_text()
    assert "## sst2: test accuracy (%) (test = GLUE dev)" in md
    assert "the test examples come from the GLUE SST-2 dev set" in md
    assert "Model: t5-tiny (peftlab's randomly initialised preset" in md
    assert "Flan" not in md.split("## Findings")[0]
    assert "over seeds with the test set held fixed" in md
    headline = pd.read_csv(paths["headline"]).set_index("label")
    assert headline.rate_at_edge["lora"] and not headline.rate_at_edge["full"]
    assert headline.configs["lora"] == 2 and headline.configs["full"] == 3
    table = md.split("## sst2")[1]
    assert "lr 0.001†" in table and "lr 0.0003 " in table and "lr 0.0003†" not in table
    assert "| lora | 100 | 100 | 9.09 | 2 |" in table  # rates tried
    # the fixture's best step is 10: no step-0 marks; the differences show what they detect
    assert "‡" not in table.split("\n\n")[1]
    assert "detects ±" in md.split("differences between methods")[1]
    sig = pd.read_csv(paths["significance"])
    assert (sig.detectable > 0).all()


def test_a_flan_model_is_said_to_have_seen_its_tasks():
    from peftlab.report.notes import describe_model, overlaps

    said = overlaps("google/flan-t5-small", ["samsum", "sst2"])
    assert len(said) == 1 and "samsum and sst2" in said[0] and "not a zero-shot" in said[0]
    assert overlaps("/models/flan-t5-base", ["sst2"]) and not overlaps("t5-small", ["sst2"])
    assert not overlaps("google/flan-t5-small", ["custom"])
    assert describe_model("google/flan-t5-small") == "google/flan-t5-small"


def test_a_configuration_that_reports_its_untrained_checkpoint_is_marked_and_counted(tmp_path):
    for seed in (0, 1, 2):
        make_run(tmp_path, f"sst2/ia3/n64/lr0.003/seed{seed}", method="ia3", label="ia3",
                 lr=3e-3, seed=seed, val=50, per_example=correct(9))
        summary = tmp_path / f"sst2/ia3/n64/lr0.003/seed{seed}/summary.json"
        import json

        data = json.loads(summary.read_text())
        data["best_step"] = 0 if seed < 2 else 10
        summary.write_text(json.dumps(data))
    md = write_report(tmp_path)["markdown"].read_text()
    assert "45.0 ± 0.0" in md and "lr 0.003 ‡2/3" in md
    assert ("1 of 1 reported trained configurations report a step-0 checkpoint for some "
            "seeds") in md and "sst2 ia3 n=64 (2/3)" in md


def test_series_that_coincide_are_named_in_the_legend(tmp_path):
    """Two methods with the same curves would hide one under the other: the legend says so."""
    for seed in (0, 1):
        for method in ("ia3", "ln"):
            make_run(tmp_path, f"sst2/{method}/n64/lr0.003/seed{seed}", method=method,
                     label=method, lr=3e-3, seed=seed, val=50, per_example=correct(9))
    figures = write_report(tmp_path)["figures"]
    curves = (figures / "curves-sst2-n64.svg").read_text()
    assert "(same values as ia3)" in curves and "first logged at step 10" in curves
    assert "(same values as ia3)" in (figures / "scaling-sst2.svg").read_text()


def test_metric_labels_give_the_scale():
    from peftlab.report import metric_label

    assert metric_label("rougeLsum", short=True) == "ROUGE-Lsum F1 (0-100)"
    assert "0-100" in metric_label("rougeLsum") and metric_label("accuracy") == "accuracy (%)"


def test_selection_rule_comes_from_the_study_file_or_the_command(tmp_path):
    from peftlab.errors import PeftlabError
    from peftlab.report import study_selection

    assert study_selection(tmp_path) == "cross-fit"
    (tmp_path / "study.yaml").write_text("name: s\nselection: grid\n")
    assert study_selection(tmp_path) == "grid"
    assert study_selection(tmp_path, "cross-fit") == "cross-fit"
    with pytest.raises(PeftlabError, match="selection 'best' is not one of cross-fit, grid"):
        study_selection(tmp_path, "best")


def test_a_completed_run_without_a_finite_test_score_is_named(tmp_path):
    import json

    for seed in (0, 1, 2):
        make_run(tmp_path, f"sst2/lora/n64/lr0.001/seed{seed}", method="lora", label="lora",
                 lr=1e-3, seed=seed, val=80, per_example=correct(10))
    summary = tmp_path / "sst2/lora/n64/lr0.001/seed1/summary.json"
    data = json.loads(summary.read_text())
    data["test_metrics"]["accuracy"] = float("nan")
    summary.write_text(json.dumps(data))
    paths = write_report(tmp_path)
    md = paths["markdown"].read_text()
    assert ("1 completed runs have no finite test score and count no seed: "
            "sst2/lora/n64/lr0.001/seed1") in md
    import pandas as pd

    assert pd.read_csv(paths["headline"]).set_index("label").seeds["lora"] == 2


def test_the_reference_rows_are_the_methods_whose_records_trained_nothing():
    """The report sets apart what trained nothing by the records' `trained_params`, not by a
    list of method names: a renamed or new baseline is a reference too, and a trained method
    with a failed run (no count recorded) is not."""
    import pandas as pd

    from peftlab.report.select import reference_methods

    table = pd.DataFrame({
        "method_name": ["untuned", "majority", "my-baseline", "lora", "lora", "full"],
        "trained_params": [0, 0, None, 81920, None, 76961152]})
    assert reference_methods(table) == ("majority", "my-baseline", "untuned")
