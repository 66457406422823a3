"""Read a study's run folders into tables, and choose each method's learning rate on validation.

Only result files are read: `summary.json`, `metrics.jsonl`, `study_cell.json` and
`predictions/test.jsonl` in each run folder, and `grid.json` to name the runs still missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from peftlab.errors import PeftlabError
from peftlab.files import read_jsonl
from peftlab.records import record_problem
from peftlab.report.select import DEFAULT_SELECTION, mark_selected

SUMMARY = "summary.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PeftlabError(f"{path}: unreadable ({e})") from None


def run_folders(study_dir: Path) -> list[Path]:
    return sorted(p.parent for p in study_dir.rglob(SUMMARY))


def headline_metric(summary: dict[str, Any]) -> str:
    """The metric tables show: the selection metric, unless that is the loss."""
    metric = summary.get("selection_metric")
    if metric and metric != "loss":
        return metric
    return next((k for k in summary.get("test_metrics", {}) if k != "loss"), "loss")


def curve_flags(rows: list[dict[str, Any]], metric: str, higher: bool) -> dict[str, Any]:
    """Step-0 and final validation values, first and last training loss, and the flag for
    'training loss fell while the validation metric ended below its untrained value'."""
    evals = [r for r in rows if f"val_{metric}" in r]
    losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    out: dict[str, Any] = {"step0_val": None, "final_val": None, "first_train_loss": None,
                           "last_train_loss": None, "flag_loss_fell_metric_fell": False}
    if evals:
        out["step0_val"] = evals[0][f"val_{metric}"] if evals[0]["step"] == 0 else None
        out["final_val"] = evals[-1][f"val_{metric}"]
    if losses:
        out["first_train_loss"], out["last_train_loss"] = losses[0], losses[-1]
    if out["step0_val"] is not None and len(evals) > 1 and len(losses) > 1:
        worse = out["final_val"] < out["step0_val"] if higher else out["final_val"] > out["step0_val"]
        out["flag_loss_fell_metric_fell"] = bool(worse and losses[-1] < losses[0])
    return out


def grid_keys(study_dir: Path) -> set[str] | None:
    """The cells of the study as last run (grid.json), None for a folder without one."""
    grid = study_dir / "grid.json"
    if not grid.is_file():
        return None
    return {c["key"] for c in _read_json(grid)}


def load_runs(study_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per run folder with a trustworthy summary, and notes on the folders left out:
    corrupt records (the file named) and runs the study's grid no longer has (an edited
    study: the report shows only what study.yaml describes)."""
    records, left_out = [], []
    grid = grid_keys(study_dir)
    for folder in run_folders(study_dir):
        key = str(folder.relative_to(study_dir))
        if grid is not None and key not in grid:
            left_out.append(f"{key}: not in the study's grid.json (left from an earlier "
                            "version of the study), not reported")
            continue
        problem = record_problem(folder)
        if problem:
            left_out.append(f"{problem}: corrupt record, not reported (`peftlab run` runs the "
                            "cell again)")
            continue
        s = _read_json(folder / SUMMARY)
        cell_file = folder / "study_cell.json"
        cell = _read_json(cell_file) if cell_file.is_file() else {}
        metric = headline_metric(s) if s.get("status") != "failed" else None
        higher = metric != "loss"
        rec: dict[str, Any] = {
            "key": key,
            "task": s.get("task"), "method": s.get("method"), "model": s.get("model"),
            "label": cell.get("label", s.get("method")),
            "method_name": cell.get("method_name", s.get("method")),
            "size_knob": cell.get("size_knob"), "size_value": cell.get("size_value"),
            "train_size": s.get("train_size"), "learning_rate": s.get("learning_rate"),
            "seed": s.get("seed"), "status": s.get("status"),
            "shared_across_sizes": bool(cell.get("shared_across_sizes", False)),
            "trainable_params": s.get("trainable_params"),
            "trained_params": s.get("trained_params", s.get("trainable_params")),
            "total_params": s.get("total_params"),
            "trainable_percent": s.get("trainable_percent"), "best_step": s.get("best_step"),
            "metric": metric, "higher_is_better": higher,
            "selection_metric": s.get("selection_metric"),
            "val_score": (s.get("val_metrics") or {}).get(s.get("selection_metric")),
            "test_score": (s.get("test_metrics") or {}).get(metric),
            "wall_time_s": s.get("wall_time_s"), "peak_memory_mb": s.get("peak_memory_mb"),
            "peak_memory_kind": s.get("peak_memory_kind", "rss_process"),
            # trained in a pack (peftlab.pack): its wall time is its share, its memory the pack's
            "pack_size": int((s.get("pack") or {}).get("size", 1)),
            "error": s.get("error"),
        }
        for k, v in (s.get("test_metrics") or {}).items():
            rec[f"test_{k}"] = v
        metrics_file = folder / "metrics.jsonl"
        if metric and metrics_file.is_file():
            rec.update(curve_flags(read_jsonl(metrics_file), metric, higher))
        records.append(rec)
    if not records:
        if not study_dir.is_dir():
            raise PeftlabError(f"{study_dir}: folder not found")
        why = f" ({left_out[0]})" if left_out else ""
        raise PeftlabError(f"{study_dir}: no finished runs (no */summary.json) to report on{why}")
    return pd.DataFrame.from_records(records), left_out


def missing_runs(study_dir: Path, runs: pd.DataFrame) -> list[str]:
    grid = study_dir / "grid.json"
    if not grid.is_file():
        return []
    have = set(runs["key"])
    return [c["key"] for c in json.loads(grid.read_text()) if c["key"] not in have]


def train_sizes(runs: pd.DataFrame, task: str) -> list:
    usable = (runs.task == task) & ~runs.shared_across_sizes & runs.test_score.notna()
    sizes = runs.loc[usable, "train_size"].unique()
    return sorted(sizes, key=lambda v: math.inf if v == "all" else v)


def select_learning_rates(runs: pd.DataFrame, selection: str = DEFAULT_SELECTION) -> pd.DataFrame:
    """Mark `selected`: the runs each (task, label, train size) reports, their rate chosen on
    validation by `selection` (peftlab.report.select)."""
    return mark_selected(runs, selection)


def expand_shared(runs: pd.DataFrame) -> pd.DataFrame:
    """Untuned and lead-3 runs do not depend on the training sample: show them at every size."""
    parts = [runs[~runs.shared_across_sizes]]
    for task in runs.task.unique():
        shared = runs[(runs.task == task) & runs.shared_across_sizes]
        for size in train_sizes(runs, task):
            parts.append(shared.assign(train_size=size))
    return pd.concat(parts, ignore_index=True)


def example_scores(study_dir: Path, key: str, metric: str, expected: float) -> dict[str, float]:
    """{example id: score} of one run's test predictions, on the metric's own scale.

    The mean must equal the test metric in the run's summary.json: the tests over examples
    and the tables then speak in the same units, and a file from another run or in another
    unit is caught here instead of printing differences 100 times too small.
    """
    path = study_dir / key / "predictions" / "test.jsonl"
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError) as e:
        raise PeftlabError(f"{path}: unreadable ({e})") from None
    scores = {str(r["id"]): float((r.get("scores") or {}).get(metric, r.get("score", math.nan)))
              for r in rows}
    mean = float(np.mean(list(scores.values()))) if scores else math.nan
    if not math.isclose(mean, expected, rel_tol=1e-6, abs_tol=1e-6):
        raise PeftlabError(
            f"{path}: the per-example {metric} scores average {mean:.6g}, but summary.json "
            f"reports test {metric} {expected:.6g}; the predictions were written by another run "
            "or an older peftlab (0-1 scores): run that cell again"
        )
    return scores
