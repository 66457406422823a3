"""The real command on t5-tiny and the real data: records, determinism, reload, baselines."""

import json

import pytest
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.files import read_jsonl
from tests.conftest import tiny_run_sets

runner = CliRunner()


def train(tmp_path, name="run", **overrides):
    sets = tiny_run_sets(tmp_path, output_dir=str(tmp_path / name), **overrides)
    args = ["train", "--quiet"] + [x for s in sets for x in ("--set", s)]
    result = runner.invoke(app, args)
    return result, tmp_path / name


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_a_run_leaves_a_complete_record(tmp_path):
    result, run_dir = train(tmp_path)
    assert result.exit_code == 0, result.output
    s = summary(run_dir)
    assert s["status"] == "completed" and s["method"] == "lora" and s["task"] == "sst2"
    assert s["trainable_params"] == s["trained_params"] == 9216
    assert s["total_params"] == 4_359_168 + 9216
    assert s["trainable_percent"] == pytest.approx(100 * 9216 / (4_359_168 + 9216))
    assert s["best_step"] in (0, 2, 4) and s["steps_done"] == 4
    assert set(s["test_metrics"]) >= {"accuracy", "generation_exact_match", "loss"}
    assert s["versions"]["torch"] and s["peak_memory_mb"] > 0 and s["wall_time_s"] > 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["train_loss"] is None and "val_accuracy" in rows[0]
    assert all(r["train_loss"] is not None and "val_loss" in r for r in rows[1:])
    # where the wall time went: each evaluation's seconds in its row, the phases in the summary
    phases = s["time_s"]
    assert set(phases) == {"setup", "training", "validation", "test"}
    assert min(phases.values()) > 0 and sum(phases.values()) <= s["wall_time_s"]
    assert all(r["eval_s"] > 0 for r in rows)
    assert phases["validation"] == pytest.approx(sum(r["eval_s"] for r in rows))
    assert phases["training"] == pytest.approx(rows[-1]["elapsed_s"] - phases["validation"])
    assert f"training {phases['training']:.1f} s" in result.output
    preds = read_jsonl(run_dir / "predictions" / "test.jsonl")
    assert len(preds) == 24 and set(preds[0]) >= {"id", "reference", "prediction", "score"}
    for metric in ("accuracy", "generation_exact_match"):  # one scale: the metric is the mean
        assert s["test_metrics"][metric] == pytest.approx(
            sum(r["scores"][metric] for r in preds) / len(preds))
    assert (run_dir / "adapter.safetensors").stat().st_size > 9216 * 4
    assert "method_args" in (run_dir / "config.yaml").read_text()
    assert not list(run_dir.glob(".*.tmp"))


def _timeless(run_dir):
    """metrics.jsonl rows without the wall-clock columns."""
    timing = ("elapsed_s", "examples_per_s", "eval_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_same_config_twice_gives_identical_metrics(tmp_path):
    _, a = train(tmp_path, "a", method="prompt")
    _, b = train(tmp_path, "b", method="prompt")
    sa, sb = summary(a), summary(b)
    assert sa["val_metrics"] == sb["val_metrics"] and sa["test_metrics"] == sb["test_metrics"]
    assert _timeless(a) == _timeless(b)
    _, c = train(tmp_path, "c", method="prompt", seed=1)
    assert read_jsonl(c / "metrics.jsonl")[-1] != read_jsonl(a / "metrics.jsonl")[-1]


@pytest.mark.parametrize("method", ["full", "prefix", "ia3", "ln"])
def test_saved_runs_reproduce_their_predictions(tmp_path, method):
    result, run_dir = train(tmp_path, method=method, max_steps=3, eval_every=3)
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["eval", "--run", str(run_dir), "--quiet"])
    assert again.exit_code == 0, again.output
    original = read_jsonl(run_dir / "predictions" / "test.jsonl")
    reloaded = read_jsonl(run_dir / "eval" / "test.jsonl")
    assert [r["prediction"] for r in original] == [r["prediction"] for r in reloaded]
    assert json.loads(again.output)["accuracy"] == summary(run_dir)["test_metrics"]["accuracy"]


def test_samsum_run_with_prefix_tuning(tmp_path):
    result, run_dir = train(tmp_path, task="samsum", method="prefix", train_size=8, val_size=4,
                            test_size=4, max_new_tokens=8, max_source_length=128, max_steps=2)
    assert result.exit_code == 0, result.output
    s = summary(run_dir)
    assert s["selection_metric"] == "rougeLsum" and "rougeL" in s["test_metrics"]
    assert s["trained_params"] > s["trainable_params"]  # the prefix MLP trains, then folds
    preds = read_jsonl(run_dir / "predictions" / "test.jsonl")
    for metric in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert s["test_metrics"][metric] == pytest.approx(
            sum(r["scores"][metric] for r in preds) / len(preds))
    assert s["data"]["train_dropped_empty_dialogues"] == 1


@pytest.mark.parametrize("method,task,metric", [
    ("untuned", "sst2", "accuracy"), ("majority", "sst2", "accuracy"),
    ("lead-3", "samsum", "rougeLsum"),
])
def test_references_need_no_training(tmp_path, method, task, metric):
    result, run_dir = train(tmp_path, method=method, task=task, test_size=20)
    assert result.exit_code == 0, result.output
    s = summary(run_dir)
    assert s["best_step"] == 0 and s["trainable_params"] == 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0]
    assert s["time_s"]["training"] == 0 and s["time_s"]["validation"] == rows[0]["eval_s"] > 0
    if method == "majority":  # the training sample's majority class is positive
        preds = read_jsonl(run_dir / "predictions" / "test.jsonl")
        assert {r["prediction"] for r in preds} == {"positive"}
        assert s["test_metrics"]["accuracy"] == pytest.approx(
            100 * sum(r["reference"] == "positive" for r in preds) / len(preds))
    if method == "lead-3":
        assert 0 < s["test_metrics"][metric] < 100


def test_a_nan_loss_marks_the_run_diverged(tmp_path):
    result, run_dir = train(tmp_path, method="full", learning_rate=1e30, max_steps=4)
    s = summary(run_dir)
    assert s["status"] == "diverged" and result.exit_code == 1
    assert s["steps_done"] < 4 and s["test_metrics"]  # the run still tests its best state


def test_a_finished_run_is_not_overwritten(tmp_path):
    _, run_dir = train(tmp_path)
    before = (run_dir / "summary.json").read_text()
    result, _ = train(tmp_path, method="prompt")
    assert result.exit_code == 2 and "already holds a finished run" in result.output
    assert (run_dir / "summary.json").read_text() == before


def test_peak_memory_is_each_runs_own_even_in_one_process(tmp_path):
    """A study's worker runs many cells in one process. Full fine-tuning of the Flan-T5-small
    geometry (weights, gradients, Adam state: about 1.2 GB) and then a LoRA run on t5-tiny:
    the process's high-water mark would give the LoRA run the full run's peak."""
    from peftlab.config import resolve_run_config
    from peftlab.run import run

    def one(name, **overrides):
        values = dict(model="t5-tiny", task="sst2", method="lora", train_size=8, val_size=8,
                      test_size=8, max_steps=1, eval_every=1, batch_size=4, eval_batch_size=8,
                      output_dir=str(tmp_path / name))
        return run(resolve_run_config({**values, **overrides}), progress=False)

    big = one("full", model="flan-t5-small-random", method="full")
    small = one("lora")
    assert big["peak_memory_kind"] == small["peak_memory_kind"] == "rss_run"
    assert big["peak_memory_mb"] - small["peak_memory_mb"] > 700, (big["peak_memory_mb"],
                                                                    small["peak_memory_mb"])


def test_train_help_lists_every_run_setting_with_its_default():
    from peftlab.config import RunConfig

    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    for name in RunConfig.model_fields:
        assert f"{name}:" in text, name
    assert "max_steps: 200 -- optimizer steps" in text and "dropout: None" in text


def test_without_a_terminal_training_logs_progress_lines(tmp_path, monkeypatch, caplog):
    import logging

    from peftlab.api import train as api_train

    monkeypatch.setenv("PEFTLAB_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="peftlab"):
        api_train({"model": "t5-tiny", "task": "sst2", "method": "lora", "train_size": 16,
                   "val_size": 8, "test_size": 8, "max_steps": 3, "eval_every": 3,
                   "batch_size": 4, "output_dir": str(tmp_path / "run")}, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train")]
    assert [line.split(",")[0] for line in lines] == ["train: step 1/3", "train: step 2/3",
                                                      "train: step 3/3"]
    assert "loss " in lines[0] and "steps/s" in lines[0] and "ETA" in lines[0]
