"""Experiment trackers a run also logs to (`log_to:`), beside its own files.

The run folder stays the record (the report reads only it); a tracker gets a copy: the
resolved config, every metrics row as it is written, the summary at the end, and in a study
the cell's labels. Each tracker is an optional extra, imported only when a run asks for it,
and each writes inside the run folder only:

    tensorboard  OUTPUT_DIR/tensorboard  event files (`tensorboard --logdir studies/NAME`)
    mlflow       OUTPUT_DIR/mlflow       a SQLite MLflow store (`mlflow ui --backend-store-uri
                                         sqlite:///OUTPUT_DIR/mlflow/mlflow-ID.db`)
    wandb        OUTPUT_DIR/wandb        a W&B offline run (`wandb sync OUTPUT_DIR/wandb/offline-run-*`)
    trackio      trackio's own store     TRACKIO_DIR (trackio's default: ~/.cache/huggingface/
                                         trackio), where its dashboard reads (`trackio show`):
                                         one store per machine, chosen by asking for trackio

Trackio has no per-run location: its store is a process-wide setting read at import. Each run
logs as `FOLDER-HASH` (the run folder's name and a hash of its path), so that the record
peftlab replaces on a resume is always its own.

A resumed run's tracker record must not keep what was logged after the checkpoint (the run
drops those metrics rows too). TensorBoard purges them itself; MLflow and W&B cannot delete
logged steps, so their folder is started again and the kept rows are logged anew.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

from peftlab.errors import ConfigError
from peftlab.records import TENSORBOARD, TRACKER_FOLDERS, flat_keys

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")  # each its package and its extra


class Tracker(Protocol):
    def row(self, row: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


def check_available(names: list[str]) -> None:
    """At config time: a tracker whose package is missing names the extra to install."""
    import importlib
    import os

    if "mlflow" in names:
        # MLflow's telemetry (read at import) writes an installation id into the user's home
        # and sends usage events: neither is part of logging a run (a user's setting wins)
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"`log_to: {name}` needs its package: pip install "
                              f"'peftlab[{name}]'") from None


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numbers (not the step; None and flags left out)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float)
            and not isinstance(v, bool)}


def _test_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's test metrics as `test_*` numbers."""
    return {f"test_{k}": v for k, v in _scalars(summary.get("test_metrics") or {}).items()}


def _public(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "versions"}


class TensorBoard:
    """Scalars under `train/`, `val/`, `test/`; config, labels and summary as text."""

    def __init__(self, folder: Path, config: dict[str, Any], labels: dict[str, Any] | None,
                 resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        if resume_step is None:  # from step 0: a run killed before its first checkpoint
            for old in folder.glob("events.out.tfevents.*"):  # logged steps it now logs again
                old.unlink()
        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None
                                    else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", _code(config))
            if labels:
                self.writer.add_text("labels", _code(labels))

    def row(self, row: dict[str, Any]) -> None:
        step = row["step"]
        for key, value in _scalars(row).items():
            name = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in (summary.get("test_metrics") or {}).items():
            self.writer.add_scalar(f"test/{key}", value, summary.get("best_step", 0))
        self.writer.add_text("summary", _code(_public(summary)))
        self.writer.close()


def _code(value: Any) -> str:
    return "```\n" + json.dumps(value, indent=2, default=str) + "\n```"


class MLflow:
    """One MLflow run in a SQLite store in the run folder (`mlflow/mlflow-ID.db`, artifacts in
    `mlflow/artifacts`; MLflow 3 refuses its old file store unless told otherwise): the config
    as params, a study cell's labels as tags, metrics by step (`val_*` as logged, test metrics
    as `test_*` at the selected step), the summary as an artifact. Through `MlflowClient`, so
    that a pack's members log at once without MLflow's process-wide active run."""

    def __init__(self, folder: Path, config: dict[str, Any], labels: dict[str, Any] | None,
                 run_name: str):
        import logging
        import uuid

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        folder.mkdir(parents=True)
        # creating a store logs its table migrations at INFO, for every run of a study
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # A new file name for each new store: MLflow keeps an engine per database URI for the
        # process's life, and one opened on a store since deleted (a resumed or overwritten
        # run starts its store again) would write to the deleted file.
        database = folder.resolve() / f"mlflow-{uuid.uuid4().hex[:8]}.db"
        self.client = MlflowClient(tracking_uri=f"sqlite:///{database}")
        experiment_id = self.client.create_experiment(
            str((labels or {}).get("study", "peftlab")),
            artifact_location=(folder.resolve() / "artifacts").as_uri())  # not the CWD's
        tags = {f"peftlab.{k}": str(v) for k, v in (labels or {}).items()}
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags) \
            .info.run_id
        params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000])
                  for k, v in flat_keys(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in values.items()])

    def row(self, row: dict[str, Any]) -> None:
        self._metrics(_scalars(row), row["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        if test := _test_scalars(summary):
            self._metrics(test, summary.get("best_step") or 0)
        self.client.log_dict(self.run_id, _public(summary), "summary.json")
        failed = summary.get("status") not in ("completed", "stopped_early")
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


# wandb's process-wide service keeps its own logs and caches in the user's home unless told
# where: there, in the folder of the run that started it (while a user's own setting wins)
_WANDB_SERVICE_DIRS = ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR",
                       "WANDB_ARTIFACT_DIR")
_wandb_runs_open = 0
_wandb_dirs_ours: set[str] = set()


class WandB:
    """A W&B run in offline mode in the run folder (synced later with `wandb sync`): the
    config, a study's name as its group and the cell's labels as tags, every metrics row at
    its step, the test metrics and the summary in the run summary. Each run its own
    (`reinit=create_new`): a pack's members log at once. The service wandb starts for a
    process writes its logs in `wandb/service` of the run that started it, and stops when the
    process's last run finishes, so that the next run's starts in its own folder."""

    def __init__(self, folder: Path, config: dict[str, Any], labels: dict[str, Any] | None,
                 run_name: str):
        import os

        import wandb

        global _wandb_runs_open
        folder.mkdir(parents=True)
        if _wandb_runs_open == 0:
            for key in _WANDB_SERVICE_DIRS:
                if key not in os.environ or key in _wandb_dirs_ours:
                    os.environ[key] = str(folder.resolve() / "service")
                    _wandb_dirs_ours.add(key)
        labels = labels or {}
        self.run = wandb.init(
            mode="offline", dir=str(folder), project=str(labels.get("study", "peftlab")),
            name=run_name, config=config, reinit="create_new",
            group=str(labels["study"]) if "study" in labels else None,
            tags=[f"{k}={v}"[:64] for k, v in labels.items() if k != "study"],
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                    x_save_requirements=False),
        )
        _wandb_runs_open += 1

    def row(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=row["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        import wandb

        global _wandb_runs_open
        for key, value in _test_scalars(summary).items():
            self.run.summary[key] = value
        for key in ("status", "best_step", "steps_done", "trainable_params"):
            if key in summary:
                self.run.summary[key] = summary[key]
        self.run.finish(exit_code=0 if summary.get("status") in ("completed", "stopped_early")
                        else 1)
        _wandb_runs_open -= 1
        if _wandb_runs_open == 0:
            wandb.teardown()


class Trackio:
    """A trackio run in trackio's local store: project = the study (or `peftlab`), group = the
    study, config with the cell's labels under `labels`, every metrics row at its step, the
    test metrics at the selected step. Its messages (printed) are kept out of the study's
    output; its CPU sampling is off (not part of a run's record)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], labels: dict[str, Any] | None):
        import contextlib
        import hashlib
        import io

        import trackio
        from trackio.sqlite_storage import SQLiteStorage

        labels = labels or {}
        self.project = str(labels.get("study", "peftlab"))
        digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
        self.name = f"{run_dir.name}-{digest}"
        SQLiteStorage.delete_run(self.project, self.name)  # ours: started again
        with contextlib.redirect_stdout(io.StringIO()):
            self.run = trackio.init(
                project=self.project, name=self.name, config={**config, "labels": labels},
                group=str(labels["study"]) if "study" in labels else None,
                auto_log_cpu=False, auto_log_gpu=False, embed=False)

    def row(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=row["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        import contextlib
        import io

        if test := _test_scalars(summary):
            self.run.log(test, step=summary.get("best_step") or 0)
        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any],
                  labels: dict[str, Any] | None, resume_step: int | None,
                  kept_rows: list[dict[str, Any]]) -> list[Tracker]:
    """The run's trackers, each holding what the run's files hold: `kept_rows` (the metrics
    rows a resumed run keeps) logged anew where a tracker cannot purge later steps."""
    check_available(names)
    out: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoard(run_dir / TENSORBOARD, config, labels, resume_step))
            continue
        if name == "trackio":  # its own record, deleted by name
            tracker: Tracker = Trackio(run_dir, config, labels)
        else:
            folder = run_dir / TRACKER_FOLDERS[name]
            shutil.rmtree(folder, ignore_errors=True)  # ours: started again
            tracker = (MLflow if name == "mlflow" else WandB)(folder, config, labels,
                                                              run_dir.name)
        for row in kept_rows:
            tracker.row(row)
        out.append(tracker)
    return out
