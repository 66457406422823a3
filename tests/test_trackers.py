"""Experiment trackers (`log_to`): what a run logged, read back with the tracker's own reader."""

import json
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


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow", "wandb"])
def test_a_missing_tracker_package_names_the_extra_before_anything_runs(tmp_path, monkeypatch,
                                                                        tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed
    with pytest.raises(ConfigError, match=rf"pip install 'peftlab\[{tracker}\]'"):
        peftlab.train({**RUN, "log_to": [tracker], "output_dir": str(tmp_path / "run")},
                      progress=False)
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


def test_a_restart_from_step_0_replaces_the_events_of_the_killed_attempt(tmp_path):
    """Killed before its first checkpoint, a run starts again from step 0: the events the
    killed attempt logged go, or TensorBoard would show steps 2, 4, 6, 2, 4, 6, 8, ..."""
    from peftlab.trackers import TensorBoard

    first = TensorBoard(tmp_path, {"seed": 0}, None, resume_step=None)
    for step in (2, 4, 6):
        first.row({"step": step, "train_loss": 10.0 + step})
    first.writer.close()
    (tmp_path / "notes.txt").write_text("mine")
    again = TensorBoard(tmp_path, {"seed": 0}, None, resume_step=None)
    for step in (2, 4, 6, 8):
        again.row({"step": step, "train_loss": 20.0 + step})
    again.writer.close()
    losses = [(e.step, e.value) for e in events(tmp_path).Scalars("train/train_loss")]
    assert losses == [(2, 22.0), (4, 24.0), (6, 26.0), (8, 28.0)]
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- MLflow and W&B -------------------------------------------------------------------------

def mlflow_client(run_dir):
    from mlflow.tracking import MlflowClient

    (database,) = (run_dir / "mlflow").glob("mlflow-*.db")
    return MlflowClient(tracking_uri=f"sqlite:///{database}")


def mlflow_run(client):
    """The store's one experiment (beside MLflow's empty `Default`) and its one run."""
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    (run,) = client.search_runs([experiment.experiment_id])
    return experiment, run


def mlflow_history(client, key):
    _, run = mlflow_run(client)
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                              key=lambda m: m.step)]


def wandb_records(run_dir):
    """Every record of the run's offline W&B file, read with wandb's own protobuf schema.

    wandb 0.31 ships no reader for its run files (its `wandb sync` is in Go), so this reads
    the format they are written in: a 7-byte header (`:W&B`, magic, version), then blocks of
    32 KiB holding chunks (crc32 4 bytes, length 2, type 1: full, first, middle, last), a
    block's last < 7 bytes zero padding."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # padding to the end of the block
            pos += left - 7
            continue
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records, key):
    out = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json)
                     for i in r.history.item}
            if key in items:
                out.append((items["_step"], items[key]))
    return out


def wandb_summary(records):
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            out.update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
    return out


def test_mlflow_gets_the_config_every_metrics_row_the_test_metrics_and_the_summary(tmp_path):
    run = peftlab.train({**RUN, "log_to": ["mlflow"], "output_dir": str(tmp_path / "run")},
                        progress=False)
    client = mlflow_client(run.path)
    experiment, logged = mlflow_run(client)
    assert experiment.name == "peftlab" and logged.info.run_name == "run"
    assert logged.info.status == "FINISHED"
    params = logged.data.params
    assert params["method"] == "lora" and params["method_args.r"] == "8"
    assert params["learning_rate"] == str(run.config.learning_rate)
    metrics = run.metrics
    assert mlflow_history(client, "val_accuracy") == [
        (int(s), pytest.approx(v)) for s, v in zip(metrics.step[metrics.val_accuracy.notna()],
                                                   metrics.val_accuracy.dropna())]
    assert [s for s, _ in mlflow_history(client, "train_loss")] == [1, 2, 3, 4]
    assert mlflow_history(client, "test_accuracy") == [
        (run.summary["best_step"], pytest.approx(run.summary["test_metrics"]["accuracy"]))]
    summary = json.loads(next((run.path / "mlflow" / "artifacts").rglob("summary.json"))
                         .read_text())
    assert summary["test_metrics"] == run.summary["test_metrics"]
    # --overwrite starts the record again: the old store goes with it
    peftlab.train({**RUN, "log_to": ["mlflow"], "output_dir": str(tmp_path / "run")},
                  progress=False, overwrite=True)
    mlflow_run(mlflow_client(run.path))  # one run again


def test_wandb_offline_run_holds_the_config_every_metrics_row_and_the_summary(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nothing may land there
    run = peftlab.train({**RUN, "log_to": ["wandb"], "output_dir": str(tmp_path / "run")},
                        progress=False)
    records = wandb_records(run.path)
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert info.display_name == "run" and info.project == "peftlab"
    config = {i.key: json.loads(i.value_json) for i in info.config.update}
    assert config["method"] == "lora" and config["seed"] == 0
    assert config["method_args"]["target_modules"] == ["q", "v"]
    metrics = run.metrics
    assert wandb_history(records, "val_accuracy") == [
        (int(s), pytest.approx(v)) for s, v in zip(metrics.step[metrics.val_accuracy.notna()],
                                                   metrics.val_accuracy.dropna())]
    assert [s for s, _ in wandb_history(records, "train_loss")] == [1, 2, 3, 4]
    summary = wandb_summary(records)
    assert summary["test_accuracy"] == pytest.approx(run.summary["test_metrics"]["accuracy"])
    assert summary["status"] == "completed"
    assert not (tmp_path / "home").exists()  # wandb's service logs are in the run folder
    peftlab.train({**RUN, "log_to": ["wandb"], "output_dir": str(tmp_path / "run")},
                  progress=False, overwrite=True)
    assert len(list((run.path / "wandb").glob("wandb/offline-run-*"))) == 1


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_resumed_run_logs_anew_only_the_rows_its_files_keep(tmp_path, tracker):
    """MLflow and W&B cannot delete logged steps: a resumed run starts the tracker's folder
    again and logs the rows it keeps, then its new ones. A study cell's labels are tags."""
    from peftlab.trackers import open_trackers

    labels = {"study": "s1", "task": "sst2", "method": "lora"}
    (first,) = open_trackers([tracker], tmp_path, {"seed": 0}, labels, None, [])
    rows = [{"step": step, "train_loss": 10.0 + step} for step in range(5)]
    for row in rows:  # killed after logging step 4; its last checkpoint was at step 2
        first.row(row)
    if tracker == "wandb":  # a killed process leaves its run unfinished
        first.run.finish()
        import peftlab.trackers as trackers

        trackers._wandb_runs_open -= 1
    (again,) = open_trackers([tracker], tmp_path, {"seed": 0}, labels, 2, rows[:3])
    for step in (3, 4):
        again.row({"step": step, "train_loss": 20.0 + step})
    again.finish({"status": "completed", "test_metrics": {"accuracy": 50.0}, "best_step": 4})
    expected = [(0, 10.0), (1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    if tracker == "mlflow":
        client = mlflow_client(tmp_path)
        assert mlflow_history(client, "train_loss") == expected
        experiment, logged = mlflow_run(client)
        assert experiment.name == "s1" and logged.data.tags["peftlab.method"] == "lora"
    else:
        records = wandb_records(tmp_path)
        assert wandb_history(records, "train_loss") == expected
        (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert info.run_group == "s1" and "method=lora" in list(info.tags)


TRACKIO_SCRIPT = """
import json, sys
import peftlab
run_config = json.loads(sys.argv[1])
first = peftlab.train(run_config, progress=False)
again = peftlab.train(run_config, progress=False, overwrite=True)  # the same run, again
from trackio.sqlite_storage import SQLiteStorage
runs = SQLiteStorage.get_runs("peftlab")
print(json.dumps({"runs": runs, "logs": SQLiteStorage.get_logs("peftlab", runs[0]),
                  "metrics": again.metrics.to_dict("list"), "summary": again.summary}))
"""


def test_trackio_logs_into_its_own_store_once_per_run(tmp_path):
    """In a fresh process: trackio reads where its store is (TRACKIO_DIR) at import."""
    import os
    import subprocess

    run_config = {**RUN, "log_to": ["trackio"], "output_dir": str(tmp_path / "run")}
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, json.dumps(run_config)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # its messages are kept out of the run's output (but the one its exit hook prints)
    assert "project initialized" not in done.stdout and "Created new run" not in done.stdout
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    (name,) = out["runs"]  # the overwritten run's record replaced, not doubled
    assert name.startswith("run-")
    logs = out["logs"]
    val = [(r["step"], r["val_accuracy"]) for r in logs if "val_accuracy" in r]
    metrics = out["metrics"]
    assert val == [(s, pytest.approx(v)) for s, v in zip(metrics["step"], metrics["val_accuracy"])
                   if v == v]  # not NaN
    assert [r["step"] for r in logs if "train_loss" in r] == [1, 2, 3, 4]
    (test,) = [r for r in logs if "test_accuracy" in r]
    assert test["step"] == out["summary"]["best_step"]
    assert test["test_accuracy"] == pytest.approx(out["summary"]["test_metrics"]["accuracy"])
    assert not (tmp_path / "home").exists()


def test_a_run_that_fails_ends_its_tracker_records_as_failed(tmp_path, monkeypatch):
    import peftlab.run
    import peftlab.trackers

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(peftlab.run, "train_pack", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        peftlab.train({**RUN, "log_to": ["mlflow", "wandb"], "output_dir": str(tmp_path / "run")},
                      progress=False)
    _, logged = mlflow_run(mlflow_client(tmp_path / "run"))
    assert logged.info.status == "FAILED"
    records = wandb_records(tmp_path / "run")
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1
    assert peftlab.trackers._wandb_runs_open == 0  # the next run's service starts in its folder
