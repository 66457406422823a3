"""What a run folder holds, read and removed safely.

A run writes a known set of files (below). `--overwrite` and a study's `--rerun-changed` remove
exactly those, never a user's own files that share the folder (a `checkpoints/model.pt` of
theirs, say), and only in a folder whose `config.yaml` is a peftlab run's. A record is
checked before it is trusted: an unreadable `summary.json`, a `metrics.jsonl` with a broken
line or no row, or unreadable test predictions make the run "corrupt", with the file named.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from peftlab.errors import PeftlabError

CONFIG, METRICS, SUMMARY, ADAPTER = "config.yaml", "metrics.jsonl", "summary.json", "adapter.safetensors"
TENSORBOARD = "tensorboard"  # log_to: tensorboard writes its event files here
# log_to: mlflow's store and wandb's offline run, whole folders of the tracker's own
TRACKER_FOLDERS = {"mlflow": "mlflow", "wandb": "wandb"}
CELL_FILE = "study_cell.json"  # a study's labels for the run: the report reads them
PREDICTIONS = "predictions/test.jsonl"
EVAL_FILES = tuple(f"eval/{split}.{ext}" for split in ("test", "validation")
                   for ext in ("json", "jsonl"))
TOP_FILES = (CONFIG, METRICS, SUMMARY, ADAPTER, CELL_FILE, PREDICTIONS, *EVAL_FILES)
CHECKPOINTS = "checkpoints"
CHECKPOINT_POINTER = "latest.json"
CHECKPOINT_DIR = re.compile(r"step-\d{6}")
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "best.safetensors",
                    "rng.safetensors", "state.json")
# atomic writes leave `.NAME.RANDOM.tmp` behind only when the process is killed mid-write
_TEMPORARY = re.compile(r"\.(.+)\.[A-Za-z0-9_]+\.tmp")
_RUN_KEYS = {"model", "method", "task", "output_dir", "seed"}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PeftlabError(f"{path}: unreadable ({e})") from None


def read_jsonl_checked(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a broken line is an error naming the file and the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PeftlabError(f"{path}: unreadable ({e})") from None
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PeftlabError(f"{path}:{i}: broken line ({e})") from None
        if not isinstance(row, dict):
            raise PeftlabError(f"{path}:{i}: not a JSON object")
        rows.append(row)
    return rows


def record_problem(run_dir: Path) -> str | None:
    """Why a finished run's record cannot be trusted (naming the file), or None."""
    try:
        summary = read_json(run_dir / SUMMARY)
        if not isinstance(summary, dict) or "status" not in summary:
            return f"{run_dir / SUMMARY}: not a run summary (no status)"
        if summary["status"] == "failed":
            return None
        rows = read_jsonl_checked(run_dir / METRICS)
        if not rows or rows[0].get("step") != 0:
            return f"{run_dir / METRICS}: no step-0 row (empty or cut)"
        read_jsonl_checked(run_dir / PREDICTIONS)
    except PeftlabError as e:
        return str(e)
    return None


def is_run_folder(folder: Path) -> bool:
    """Does `folder` hold a peftlab run's record: its resolved config, or the summary of a
    run that failed before writing one?"""
    try:
        config = yaml.safe_load((folder / CONFIG).read_text(encoding="utf-8"))
        if isinstance(config, dict) and _RUN_KEYS <= set(config):
            return True
    except (OSError, ValueError, yaml.YAMLError):
        pass
    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"status", "method", "task"} <= set(summary)


def run_files(folder: Path) -> list[Path]:
    """The files in `folder` that a run writes (and its temporaries), that exist."""
    found = [folder / name for name in TOP_FILES if (folder / name).is_file()]
    root = folder / CHECKPOINTS
    if (root / CHECKPOINT_POINTER).is_file():
        found.append(root / CHECKPOINT_POINTER)
    if root.is_dir():
        for step in root.iterdir():
            if step.is_dir() and CHECKPOINT_DIR.fullmatch(step.name):
                found += [step / n for n in CHECKPOINT_FILES if (step / n).is_file()]
    # `log_to: tensorboard` event files (peftlab.trackers)
    found += sorted((folder / TENSORBOARD).glob("events.out.tfevents.*"))
    return found + temporaries(folder)


def temporaries(folder: Path) -> list[Path]:
    """Temporary files of killed atomic writes (of the run's own files only)."""
    names = {Path(n).name for n in (*TOP_FILES, *CHECKPOINT_FILES, CHECKPOINT_POINTER)}
    out = []
    for sub in (folder, folder / "predictions", folder / "eval", folder / CHECKPOINTS,
                *sorted((folder / CHECKPOINTS).glob("step-*"))):
        if sub.is_dir():
            out += [p for p in sub.iterdir() if p.is_file()
                    and (m := _TEMPORARY.fullmatch(p.name)) and m.group(1) in names]
    return out


def remove_run_files(folder: Path) -> None:
    """Delete what a run wrote into `folder` (after checking it is a run), nothing else;
    folders the run made are removed only when nothing else is left in them."""
    if not folder.exists():
        return
    files = run_files(folder)
    if not is_run_folder(folder):
        if files:
            names = ", ".join(str(p.relative_to(folder)) for p in files[:5])
            raise PeftlabError(
                f"{folder} holds {names} but no peftlab run record ({CONFIG}); nothing was "
                "deleted: choose another output_dir, or remove those files yourself")
        return
    for path in files:
        path.unlink(missing_ok=True)
    for name in TRACKER_FOLDERS.values():  # a tracker's own folder (peftlab.trackers), whole
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)
    for sub in (*sorted((folder / CHECKPOINTS).glob("step-*")), folder / CHECKPOINTS,
                folder / "predictions", folder / "eval", folder / TENSORBOARD):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()


def remove_checkpoint_step(step_dir: Path) -> None:
    """One `checkpoints/step-NNNNNN` folder: its files, then the folder if nothing else is in it."""
    for name in CHECKPOINT_FILES:
        (step_dir / name).unlink(missing_ok=True)
    for tmp in step_dir.glob(".*.tmp"):
        if (m := _TEMPORARY.fullmatch(tmp.name)) and m.group(1) in CHECKPOINT_FILES:
            tmp.unlink(missing_ok=True)
    if step_dir.is_dir() and not any(step_dir.iterdir()):
        step_dir.rmdir()


def has_checkpoints(run_dir: Path) -> bool:
    """Does the run keep training checkpoints (its pointer or a step folder)?"""
    root = run_dir / CHECKPOINTS
    return (root / CHECKPOINT_POINTER).is_file() or any(
        p.is_dir() and CHECKPOINT_DIR.fullmatch(p.name) for p in root.glob("step-*"))


def remove_checkpoints(run_dir: Path) -> None:
    """A run's training checkpoints (a finished run keeps only its selected state); a user's
    own files in `checkpoints/` stay."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return
    (root / CHECKPOINT_POINTER).unlink(missing_ok=True)
    for step in root.iterdir():
        if step.is_dir() and CHECKPOINT_DIR.fullmatch(step.name):
            remove_checkpoint_step(step)
    if not any(root.iterdir()):
        root.rmdir()


def quarantine(path: Path) -> Path:
    """Keep a corrupt file for inspection, out of the way: NAME.corrupt (numbered)."""
    target = path.with_name(path.name + ".corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt{n}")
    shutil.move(str(path), str(target))
    return target


def flat_keys(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (`method_args.r`); an empty mapping stays one value."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
