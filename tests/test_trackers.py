"""Experiment trackers (`log_to`): what a run logged, read back with the tracker's own reader."""

import sys

import pytest

import peftlab
from peftlab.errors import ConfigError

RUN = dict(model="t5-tiny", task="sst2", method="lora", train_size=16, val_size=8, test_size=8,
           max_steps=4, eval_every=2, log_every=1, batch_size=4, log_to=["tensorboard"])


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_the_config_every_metrics_row_and_the_test_metrics(tmp_path):
    run = peftlab.train({**RUN, "output_dir": str(tmp_path / "run")}, progress=False)
    acc = events(run.path / "tensorboard")
    scalars = set(acc.Tags()["scalars"])
    assert {"val/accuracy", "val/loss", "train/train_loss", "train/lr", "test/accuracy"} <= scalars
    metrics = run.metrics
    assert [e.step for e in acc.Scalars("val/accuracy")] == list(
        metrics.step[metrics.val_accuracy.notna()])
    assert [e.value for e in acc.Scalars("val/accuracy")] == pytest.approx(
        list(metrics.val_accuracy.dropna()))
    assert [e.step for e in acc.Scalars("train/train_loss")] == [1, 2, 3, 4]
    (test,) = acc.Scalars("test/accuracy")
    assert test.step == run.summary["best_step"]
    assert test.value == pytest.approx(run.summary["test_metrics"]["accuracy"])
    texts = set(acc.Tags()["tensors"])
    assert {"config/text_summary", "summary/text_summary"} <= texts
    # --overwrite starts the record again: the old events go with it
    peftlab.train({**RUN, "output_dir": str(tmp_path / "run")}, progress=False, overwrite=True)
    assert len(list((run.path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_missing_tracker_package_names_the_extra_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'peftlab\[tensorboard\]'"):
        peftlab.train({**RUN, "output_dir": str(tmp_path / "run")}, progress=False)
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="log_to"):
        peftlab.train({**RUN, "log_to": ["tensorbord"], "output_dir": str(tmp_path / "run")},
                      progress=False)


def test_a_resumed_run_replaces_the_events_logged_after_its_checkpoint(tmp_path):
    from peftlab.trackers import TensorBoard

    first = TensorBoard(tmp_path, {"seed": 0}, None, resume_step=None)
    for step in range(5):  # killed after logging step 4; its last checkpoint was at step 2
        first.row({"step": step, "train_loss": 10.0 + step})
    first.writer.close()
    again = TensorBoard(tmp_path, {"seed": 0}, None, resume_step=2)
    for step in (3, 4):
        again.row({"step": step, "train_loss": 20.0 + step})
    again.finish({"test_metrics": {"accuracy": 50.0}, "best_step": 4})
    losses = [(e.step, e.value) for e in events(tmp_path).Scalars("train/train_loss")]
    assert losses == [(0, 10.0), (1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
