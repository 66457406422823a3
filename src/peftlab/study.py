"""A study: a grid of runs (tasks x methods x sizes x train sizes x learning rates x seeds).

The runner knows nothing about methods: it expands the study file into run configs, gives
each its own folder, and runs the ones without a `summary.json`, each under a lock, in this
process, in worker processes, or as Ray tasks. Killing it at any moment loses nothing: the
next start skips finished runs and resumes unfinished ones from their checkpoints.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftlab.config import RunConfig, format_validation_error, read_yaml_mapping
from peftlab.errors import ConfigError, PeftlabError, unknown_name
from peftlab.files import write_json, write_yaml

SHORT_KNOBS = {"num_virtual_tokens": "n", "num_prefix_tokens": "n"}  # labels: prompt-n20, lora-r8
CELL_FILE = "study_cell.json"  # written into each run folder: the report reads labels from it
LOCK_FILE = ".lock"
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT}


class MethodSpec(BaseModel):
    """One method of the study, with its own settings, size knob and learning-rate candidates."""

    model_config = ConfigDict(extra="forbid")
    method: str
    label: str | None = Field(None, description="name in tables and plots; default: method")
    method_args: dict[str, Any] = Field(default_factory=dict)
    sizes: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="size knob: method_args key -> values, zipped; the first key names the knob",
    )
    size_label: str | None = Field(None, description="prefix of the size in labels, e.g. r")
    learning_rates: list[float] | None = Field(None, description="None: the method's default")
    overrides: dict[str, Any] = Field(default_factory=dict, description="other run settings")

    @model_validator(mode="after")
    def _check(self) -> MethodSpec:
        lengths = {len(v) for v in self.sizes.values()}
        if len(lengths) > 1:
            raise ValueError("all `sizes` lists must have the same length (they are zipped)")
        if self.learning_rates is not None and (
            not self.learning_rates or any(lr <= 0 for lr in self.learning_rates)
        ):
            raise ValueError("`learning_rates` must be positive numbers")
        return self

    @property
    def name(self) -> str:
        return self.label or self.method


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "study"
    base: dict[str, Any] = Field(default_factory=dict, description="run settings for every run")
    tasks: dict[str, dict[str, Any]] = Field(description="task name -> its run settings")
    methods: list[MethodSpec] = Field(min_length=1)
    train_sizes: list[int | Literal["all"]] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: where it lives, and the config it runs."""

    key: str  # the run folder, relative to the study folder
    config: RunConfig
    labels: dict[str, Any]  # task, method label, size knob and value, train size, lr, seed


def load_study(path: str | Path | None = None, preset: str | None = None) -> StudyConfig:
    if (path is None) == (preset is None):
        raise ConfigError("give a study file or --preset NAME (not both)")
    if preset is not None:
        names = preset_names()
        if preset not in names:
            raise unknown_name("preset", preset, names)
        raw = read_yaml_mapping(Path(str(resources.files("peftlab.presets") / f"{preset}.yaml")))
        where = f"preset {preset}"
    else:
        raw = read_yaml_mapping(path)
        where = str(path)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation_error(e, '', StudyConfig)}") from None


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("peftlab.presets").iterdir()
                  if p.name.endswith(".yaml"))


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expand(study: StudyConfig, study_dir: Path) -> list[Cell]:
    """Every run of the study, validated as a run config (errors name the cell)."""
    from peftlab.config import resolve_run_config
    from peftlab.methods import Baseline, get_method
    from peftlab.tasks import build_task

    cells: list[Cell] = []
    seen: set[str] = set()
    for task_name, task_settings in study.tasks.items():
        task_kind = build_task(task_name, task_settings.get("task_args", {})).kind
        for spec in study.methods:
            method = get_method(spec.method)
            if isinstance(method, Baseline) and method.task_kind != task_kind:
                continue  # majority for classification, lead-3 for generation
            knob = next(iter(spec.sizes), None)
            n_sizes = len(spec.sizes[knob]) if knob else 1
            # What a run depends on decides which axes it spans: untuned and lead-3 depend on
            # neither the training sample nor the rate, majority only on the training sample.
            trains = method.trains
            depends_on_sample = trains or spec.method == "majority"
            lrs = (spec.learning_rates or [None]) if trains else [None]
            sizes = study.train_sizes if depends_on_sample else [study.train_sizes[0]]
            seeds = study.seeds if depends_on_sample else [study.seeds[0]]
            short = spec.size_label if spec.size_label is not None else SHORT_KNOBS.get(knob, knob)
            for i, train_size, lr, seed in itertools.product(range(n_sizes), sizes, lrs, seeds):
                size_args = {k: v[i] for k, v in spec.sizes.items()}
                label = spec.name + (f"-{short}{_fmt(size_args[knob])}" if knob else "")
                parts = [task_name, label]
                if depends_on_sample:
                    parts += [f"n{train_size}"]
                if lr is not None:
                    parts += [f"lr{_fmt(lr)}"]
                if depends_on_sample:
                    parts += [f"seed{seed}"]
                key = "/".join(parts)
                if key in seen:
                    raise ConfigError(f"two cells share the folder {key}: give the methods "
                                      "distinct `label`s")
                seen.add(key)
                raw = {**study.base, **task_settings, **spec.overrides,
                       "task": task_name, "method": spec.method,
                       "method_args": {**spec.method_args, **size_args},
                       "train_size": train_size, "seed": seed, "output_dir": str(study_dir / key)}
                if lr is not None:
                    raw["learning_rate"] = lr
                try:
                    cfg = resolve_run_config(raw)
                except PeftlabError as e:
                    raise ConfigError(f"study cell {key}: {e}") from None
                cells.append(Cell(key, cfg, {
                    "task": task_name, "method": spec.method, "label": label,
                    "method_name": spec.name, "size_knob": knob,
                    "size_value": size_args.get(knob) if knob else None,
                    "train_size": train_size, "learning_rate": cfg.learning_rate,
                    "seed": seed, "shared_across_sizes": not depends_on_sample,
                }))
    return cells


# --- locks: one per run folder, so two runners never run the same cell -------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Yield True with the lock held, False if a live process holds it.

    A lock left by a dead process on this host is taken over. Locks from other hosts are
    respected (a shared cluster folder): remove the `.lock` file by hand if that host is gone.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            stale = holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1)))
            if not holder or stale:
                path.unlink(missing_ok=True)  # a dead process's lock, or a half-written one
                continue
            yield False
            return
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


# --- running one cell, wherever it runs ----------------------------------------------------

def run_cell(config: dict[str, Any], labels: dict[str, Any], threads: int | None = None,
             progress: bool = False) -> str:
    """Run one cell under its lock; record failures instead of raising. Returns the status."""
    import torch

    from peftlab.run import run

    if threads:
        torch.set_num_threads(threads)
    cfg = RunConfig.model_validate(config)
    run_dir = Path(cfg.output_dir)
    with run_lock(run_dir) as held:
        if not held:
            return "locked"
        if (run_dir / "summary.json").exists():
            return "skipped"  # another runner finished it since this one listed the grid
        write_json(run_dir / CELL_FILE, labels)
        try:
            return run(cfg, progress=progress)["status"]
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:  # every later run would fail the same way: stop
                raise
            return _record_failure(run_dir, cfg, e)
        except Exception as e:  # noqa: BLE001 - a failed run is a result, not the end of a study
            return _record_failure(run_dir, cfg, e)


def _record_failure(run_dir: Path, cfg: RunConfig, e: Exception) -> str:
    write_json(run_dir / "summary.json", {
        "status": "failed", "method": cfg.method, "task": cfg.task,
        "train_size": cfg.train_size, "seed": cfg.seed, "learning_rate": cfg.learning_rate,
        "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=20),
    })
    return "failed"


def pending(cells: list[Cell], retry_failed: bool) -> list[Cell]:
    """Cells without a finished summary (failed ones too, with retry_failed)."""
    out = []
    for cell in cells:
        summary = Path(cell.config.output_dir) / "summary.json"
        if summary.exists():
            if not retry_failed or json.loads(summary.read_text()).get("status") != "failed":
                continue
            summary.unlink()
        out.append(cell)
    return out


# --- running the grid ----------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(gpu_queue: Any, threads: int) -> None:
    """Pin a worker process to one GPU (several workers may share it) before torch starts."""
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())
    _WORKER["threads"] = threads


def _worker_run(config: dict[str, Any], labels: dict[str, Any]) -> str:
    return run_cell(config, labels, threads=_WORKER.get("threads"))


def threads_per_worker(workers: int) -> int:
    """CPU threads each of `workers` parallel runs gets: the CPUs split between them."""
    return max(1, (os.cpu_count() or 1) // workers)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def execute(cells: list[Cell], workers: int = 1, backend: Literal["local", "ray"] = "local",
            address: str | None = None, runs_per_gpu: int = 1,
            progress: bool = True) -> dict[str, int]:
    """Run the cells; returns how many ended in each status."""
    from tqdm.auto import tqdm

    counts: dict[str, int] = {}
    bar = tqdm(total=len(cells), desc="study", unit="run", disable=not progress or None)

    def done(status: str) -> None:
        counts[status] = counts.get(status, 0) + 1
        bar.update(1)
        bar.set_postfix(counts)

    jobs = [(c.config.model_dump(), c.labels) for c in cells]
    if backend == "ray":
        _execute_ray(jobs, address, runs_per_gpu, done)
    elif workers <= 1:
        for config, labels in jobs:
            done(run_cell(config, labels, progress=progress))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")  # no forked torch state in the workers
        gpus = gpu_count()
        queue = None
        if gpus:
            queue = ctx.Manager().Queue()
            for i in range(workers):
                queue.put(i % gpus)  # runs_per_gpu workers per GPU
        threads = threads_per_worker(workers)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, threads)) as pool:
            futures = [pool.submit(_worker_run, config, labels) for config, labels in jobs]
            for future in as_completed(futures):
                done(future.result())
    bar.close()
    return counts


def _execute_ray(jobs: list, address: str | None, runs_per_gpu: int, done: Any) -> None:
    try:
        import ray
    except ImportError:
        raise PeftlabError("--backend ray needs Ray: pip install 'peftlab[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    remote = ray.remote(num_cpus=1, num_gpus=(1 / runs_per_gpu) if gpus else 0)(run_cell)
    pending_refs = [remote.remote(config, labels, 1) for config, labels in jobs]
    try:
        while pending_refs:
            ready, pending_refs = ray.wait(pending_refs, num_returns=1)
            done(ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()


def write_study_files(study: StudyConfig, cells: list[Cell], study_dir: Path) -> None:
    """The study as run, and its grid: what the report compares the run folders against."""
    write_yaml(study_dir / "study.yaml", study.model_dump())
    write_json(study_dir / "grid.json", [{"key": c.key, **c.labels} for c in cells])


def describe(cells: list[Cell], todo: list[Cell]) -> str:
    """The --dry-run text: runs per task and method, steps, and a time estimate if possible."""
    lines = [f"{len(cells)} runs ({len(todo)} to run, {len(cells) - len(todo)} finished)"]
    by: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        by.setdefault((c.labels["task"], c.labels["method_name"]), []).append(c)
    total_steps = 0
    measured: dict[tuple[str, str], float] = {}
    for (task, name), group in by.items():
        steps = sum(c.config.max_steps if c.labels["learning_rate"] else 0 for c in group)
        total_steps += steps
        walls = [json.loads(p.read_text()).get("wall_time_s") for c in group
                 if (p := Path(c.config.output_dir) / "summary.json").exists()]
        walls = [w for w in walls if w]
        if walls:
            measured[(task, name)] = sum(walls) / len(walls)
        est = f", {measured[(task, name)]:.1f} s/run measured" if walls else ""
        lines.append(f"  {task:10s} {name:12s} {len(group):5d} runs  {steps:8d} steps{est}")
    lines.append(f"total optimizer steps: {total_steps}")
    todo_known = [c for c in todo if (c.labels["task"], c.labels["method_name"]) in measured]
    if todo_known:
        eta = sum(measured[(c.labels["task"], c.labels["method_name"])] for c in todo_known)
        lines.append(f"estimated time for {len(todo_known)} of the {len(todo)} pending runs "
                     f"(from finished ones): {eta / 3600:.2f} h on one worker")
    return "\n".join(lines)
