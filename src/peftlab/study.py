"""A study: a grid of runs (tasks x methods x sizes x train sizes x learning rates x seeds).

The runner knows nothing about methods: it expands the study file into run configs, gives
each its own folder, and runs the ones without a `summary.json`, each under a lock, in this
process, in worker processes, or as Ray tasks. Killing it at any moment loses nothing: the
next start skips finished runs and resumes unfinished ones from their checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from peftlab.config import RunConfig, config_changes, format_validation_error, read_yaml_mapping
from peftlab.errors import STORAGE_ERRNOS, ConfigError, PeftlabError, describe_os_error, unknown_name
from peftlab.files import write_json, write_yaml
from peftlab.locks import describe_holder, run_lock
from peftlab.records import (
    CELL_FILE,
    CONFIG,
    METRICS,
    PREDICTIONS,
    SUMMARY,
    has_checkpoints,
    quarantine,
    read_json,
    record_problem,
    remove_checkpoints,
    remove_run_files,
    temporaries,
)

log = logging.getLogger("peftlab")

SHORT_KNOBS = {"num_virtual_tokens": "n", "num_prefix_tokens": "n"}  # labels: prompt-n20, lora-r8
# a label or task name becomes one folder name: letters, digits and . _ + = - only, not
# starting with a dot (no `..`, no `/`: nothing a study builds may leave its folder)
SAFE_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]*")


def _unique(values: list, what: str) -> list:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{what} {', '.join(repeated)} given more than once")
    return values


def _safe_name(value: str, what: str) -> str:
    if not SAFE_NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a plain folder name (letters, digits, "
                         "'.', '_', '+', '=', '-'; no '/' or leading '.')")
    return value


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

    @field_validator("label", "size_label")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        return None if v is None else _safe_name(v, "the name") if v else v

    @model_validator(mode="after")
    def _check(self) -> MethodSpec:
        lengths = {len(v) for v in self.sizes.values()}
        if len(lengths) > 1:
            raise ValueError("all `sizes` lists must have the same length (they are zipped)")
        if self.sizes:
            _unique(next(iter(self.sizes.values())), "sizes: the value")
        if self.learning_rates is not None and (
            not self.learning_rates or any(lr <= 0 for lr in self.learning_rates)
        ):
            raise ValueError("`learning_rates` must be positive numbers")
        if self.learning_rates:
            _unique(self.learning_rates, "learning_rates: the rate")
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
    pack: int = Field(1, ge=1, description="runs trained together on one copy of the base "
                      "model (peftlab.pack): cells that differ only in seed, learning rate and "
                      "train size, of a method that can be packed; 1: every run alone")
    selection: Literal["cross-fit", "grid"] = Field(
        "cross-fit", description="how the report chooses each method's rate and size on "
        "validation: cross-fit (each seed's run by the other seeds' validation) or grid (one "
        "choice by the mean over all seeds); peftlab.report.select")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return _safe_name(v, "the study name")

    @field_validator("tasks")
    @classmethod
    def _plain_tasks(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in v:
            _safe_name(name, "the task name")
        return v

    @field_validator("train_sizes", "seeds")
    @classmethod
    def _no_repeats(cls, v: list, info: ValidationInfo) -> list:
        return _unique(v, {"train_sizes": "the train size", "seeds": "the seed"}[info.field_name])


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
    return study_config(raw, where)


def study_config(raw: dict[str, Any], where: str = "study") -> StudyConfig:
    """A study's settings validated (errors name the field and `where` they came from)."""
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
    # absolute: a cell's config names its folder wherever it runs (a Ray worker's folder is
    # not the driver's), and the same study reached by another path is the same study
    study_dir = Path(os.path.abspath(study_dir))
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
                if not SAFE_NAME.fullmatch(label) or not (study_dir / key).resolve().is_relative_to(
                        study_dir.resolve()):
                    raise ConfigError(f"study cell {key}: the label {label!r} (from the method's "
                                      "`label`, `size_label` or `sizes` values) is not a plain "
                                      "folder name inside the study folder")
                if key in seen:
                    raise ConfigError(f"two cells share the folder {key}: give the methods "
                                      "distinct `label`s")
                seen.add(key)
                # one CPU thread per run unless the study says otherwise: a run's result must
                # not depend on how many runs share the machine (RunConfig.cpu_threads)
                raw = {"cpu_threads": 1, **study.base, **task_settings, **spec.overrides,
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


# --- which cells run, and what the folder already holds --------------------------------

@dataclass
class Plan:
    """What a start of the study will do. Built by reading only; `apply` changes files."""

    todo: list[Cell] = field(default_factory=list)
    finished: int = 0
    corrupt: list[tuple[Cell, str]] = field(default_factory=list)  # rerun: record unusable
    changed: list[tuple[Cell, list[str]]] = field(default_factory=list)  # other settings
    retried: list[Cell] = field(default_factory=list)  # failed, run again (--retry-failed)

    def messages(self) -> list[str]:
        out = [f"{problem}: the cell runs again" for _, problem in self.corrupt]
        out += [f"{c.key}: finished with other settings ({'; '.join(d[:4])}): runs again "
                "(--rerun-changed)" for c, d in self.changed]
        return out


def plan(cells: list[Cell], retry_failed: bool = False, rerun_changed: bool = False) -> Plan:
    """Sort the grid's cells: finished (skipped), to run, corrupt records, changed settings.

    A cell whose folder holds a run made with other settings (an edited study file) is never
    reused silently: without `rerun_changed` this is an error that names the cells and what
    changed; with it, those cells run again.
    """
    out = Plan()
    for cell in cells:
        folder = Path(cell.config.output_dir)
        if not (folder / SUMMARY).exists():
            unreadable = _unreadable_config(folder)
            if unreadable:  # an unfinished run whose settings cannot be known: start afresh
                out.corrupt.append((cell, unreadable))
                out.todo.append(cell)
                continue
            diff = _changes(folder, cell)
            if diff:
                out.changed.append((cell, diff))
            out.todo.append(cell)
            continue
        problem = record_problem(folder)
        if problem:
            out.corrupt.append((cell, problem))
            out.todo.append(cell)
            continue
        diff = _changes(folder, cell)
        if diff:
            out.changed.append((cell, diff))
            out.todo.append(cell)
        elif retry_failed and read_json(folder / SUMMARY).get("status") == "failed":
            out.retried.append(cell)
            out.todo.append(cell)
        else:
            out.finished += 1
    if out.changed and not rerun_changed:
        shown = "; ".join(f"{c.key} ({', '.join(d[:3])})" for c, d in out.changed[:5])
        more = f" and {len(out.changed) - 5} more" if len(out.changed) > 5 else ""
        raise ConfigError(
            f"{len(out.changed)} cells of this study folder were run with other settings than "
            f"the study file gives now: {shown}{more}. Nothing was changed. Run them again with "
            "--rerun-changed (their old results are deleted), or restore the study file.")
    return out


def _unreadable_config(folder: Path) -> str | None:
    """Why the run's config.yaml cannot be read (naming it), or None (readable or absent)."""
    if not (folder / CONFIG).is_file():
        return None
    try:
        read_yaml_mapping(folder / CONFIG)
    except ConfigError as e:
        return f"{folder / CONFIG}: unreadable ({e})"
    return None


def _changes(folder: Path, cell: Cell) -> list[str]:
    """How the run in `folder` was configured differently from `cell` (locations aside)."""
    if not (folder / CONFIG).is_file():
        return []
    try:
        previous = read_yaml_mapping(folder / CONFIG)
    except ConfigError as e:
        return [f"unreadable {CONFIG} ({e})"]
    return config_changes(previous, cell.config.model_dump())


def apply(p: Plan) -> None:
    """Make the folders match the plan: corrupt records set aside, the run files of changed
    and retried cells removed (a user's own files stay), leftovers of killed writes removed
    from finished runs."""
    for cell, _ in p.corrupt:
        folder = Path(cell.config.output_dir)
        if _unreadable_config(folder):  # its checkpoints cannot be tied to settings: dropped
            quarantine(folder / CONFIG)
            remove_checkpoints(folder)
        for name in (SUMMARY, METRICS, PREDICTIONS):
            if (folder / name).is_file():
                quarantine(folder / name)
    for cell, _ in p.changed:
        remove_run_files(Path(cell.config.output_dir))
    for cell in p.retried:  # a failed run resumes from its last checkpoint, if it has one
        (Path(cell.config.output_dir) / SUMMARY).unlink(missing_ok=True)


def clean_finished(cells: list[Cell]) -> list[str]:
    """What a kill left in finished runs (those with no live writer): temporary files, and
    training checkpoints (weights and optimizer state) kept by a kill between summary.json
    and their removal. Returns the keys of the runs whose checkpoints were removed."""
    removed = []
    for cell in cells:
        folder = Path(cell.config.output_dir)
        if not (folder / SUMMARY).exists():
            continue
        if not (temporaries(folder) or has_checkpoints(folder)):
            continue
        with run_lock(folder) as holder:
            if holder is None:
                for tmp in temporaries(folder):
                    tmp.unlink(missing_ok=True)
                if has_checkpoints(folder):
                    remove_checkpoints(folder)
                    removed.append(cell.key)
    return removed


def pending(cells: list[Cell], retry_failed: bool) -> list[Cell]:
    """Cells without a finished summary (failed ones too, with retry_failed); applies the plan."""
    p = plan(cells, retry_failed)
    apply(p)
    return p.todo


# --- running one cell, wherever it runs ----------------------------------------------------

def run_cell(config: dict[str, Any], labels: dict[str, Any], progress: bool = False) -> str:
    """Run one cell under its lock; record failures instead of raising. Returns the status
    ("locked: HOLDER" when another process holds the cell)."""
    return run_cells([config], [labels], progress)[0]


def run_cells(configs: list[dict[str, Any]], labels: list[dict[str, Any]],
              progress: bool = False, pack_id: str | None = None) -> list[str]:
    """Run cells as one pack (peftlab.pack), each under its lock; a cell another process
    holds, or has finished since the grid was listed, is left out. A pack that fails is run
    again one cell at a time, so that a failure is recorded in the cell that caused it (a
    cell resumes alone from its pack's checkpoint: the files are the same)."""
    from peftlab.run import run_pack

    cfgs = [RunConfig.model_validate(c) for c in configs]
    statuses: list[str | None] = [None] * len(cfgs)
    with contextlib.ExitStack() as held:
        ready = []
        for i, cfg in enumerate(cfgs):
            run_dir = Path(cfg.output_dir)
            holder = held.enter_context(run_lock(run_dir))
            if holder is not None:
                statuses[i] = f"locked: {describe_holder(holder)}"
            elif (run_dir / SUMMARY).exists():
                statuses[i] = "skipped"  # another runner finished it since the grid was listed
            else:
                ready.append(i)
        if len(ready) > 1:
            try:
                for i in ready:
                    write_json(Path(cfgs[i].output_dir) / CELL_FILE, labels[i])
                summaries = run_pack([cfgs[i] for i in ready], progress=progress, locked=True,
                                     pack_id=pack_id)
                for i, summary in zip(ready, summaries):
                    statuses[i] = summary["status"]
                ready = []
            except OSError as e:
                if e.errno in STORAGE_ERRNOS:  # every later run would fail the same way: stop
                    raise PeftlabError(f"the study stopped at a pack of {len(ready)} cells: "
                                       f"{describe_os_error(e)}") from None
            except Exception as e:  # noqa: BLE001 - each cell alone records its own failure
                log.warning("a pack of %d cells failed (%s: %s); its cells run one by one",
                            len(ready), type(e).__name__, e)
        for i in ready:
            summary = Path(cfgs[i].output_dir) / SUMMARY
            statuses[i] = (read_json(summary).get("status", "failed") if summary.exists()
                           else _run_alone(cfgs[i], labels[i], progress))
    return [s or "failed" for s in statuses]


def _run_alone(cfg: RunConfig, labels: dict[str, Any], progress: bool) -> str:
    """One cell whose lock this process holds."""
    from peftlab.run import run

    run_dir = Path(cfg.output_dir)
    try:
        write_json(run_dir / CELL_FILE, labels)
        return run(cfg, progress=progress, locked=True)["status"]
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:  # every later run would fail the same way: stop
            raise PeftlabError(f"the study stopped at cell {run_dir}: "
                               f"{describe_os_error(e)}") from None
        return _record_failure(run_dir, cfg, e)
    except Exception as e:  # noqa: BLE001 - a failed run is a result, not the end of a study
        return _record_failure(run_dir, cfg, e)


def packs(cells: list[Cell], size: int, slots: int = 1) -> list[list[Cell]]:
    """The cells in packs of up to `size`: cells whose runs may train together (same task,
    model, method and size, schedule; any seed, learning rate and train size) and whose
    method can be packed; every other cell alone. A group larger than `size` is split evenly
    (9 cells in packs of up to 8: 5 and 4, not 8 and a run alone). Fewer packs than `slots`
    (workers) would leave workers idle: the largest packs are halved until each has one (8
    cells on 2 CPUs in packs of up to 8: two packs of 4, where one pack of 8 ran 1.2x slower
    on one CPU with the other idle). In grid order (a pack where its first cell is)."""
    from peftlab.run import pack_key, packable

    groups: dict[str, list[Cell]] = {}
    order: list[list[Cell]] = []
    for cell in cells:
        if size <= 1 or not packable(cell.config):
            order.append([cell])
            continue
        key = pack_key(cell.config)
        if key not in groups:
            groups[key] = []
            order.append(groups[key])
        groups[key].append(cell)
    out = [part for group in order for part in _even(group, -(-len(group) // max(size, 1)))]
    while len(out) < slots and any(len(g) > 1 for g in out):
        largest = max(range(len(out)), key=lambda i: len(out[i]))
        out[largest:largest + 1] = _even(out[largest], 2)
    return out


def _even(group: list[Cell], count: int) -> list[list[Cell]]:
    """`group` in `count` consecutive parts whose sizes differ by at most one."""
    base, extra = divmod(len(group), count)
    out, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        out.append(group[start:end])
        start = end
    return out


def pack_name(cells: list[Cell]) -> str:
    """A pack's id in its members' summaries: the same cells give the same id."""
    return hashlib.sha1("\n".join(c.key for c in cells).encode()).hexdigest()[:12]


def _record_failure(run_dir: Path, cfg: RunConfig, e: Exception) -> str:
    write_json(run_dir / SUMMARY, {
        "status": "failed", "method": cfg.method, "task": cfg.task,
        "train_size": cfg.train_size, "seed": cfg.seed, "learning_rate": cfg.learning_rate,
        "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=20),
    })
    return "failed"


# --- running the grid ----------------------------------------------------------------------

def _exit_with_parent(parent: int) -> None:
    """A worker's watchdog: when the study's main process is gone (killed with SIGKILL, say)
    the worker is re-parented; it then exits at once instead of running the queue on alone.
    Its run folder's lock dies with it (peftlab.locks), and its files are atomic."""
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


def _init_worker(gpu_queue: Any, parent: int) -> None:
    """Pin a worker process to one GPU (several workers may share it) before torch starts,
    and tie its life to the main process."""
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def threads_per_worker(workers: int) -> int:
    """CPU threads each of `workers` parallel runs gets: the CPUs split between them."""
    return max(1, (os.cpu_count() or 1) // workers)


def worker_gpus(gpus: int) -> list[str]:
    """The GPUs workers are pinned to, as CUDA_VISIBLE_DEVICES names them: the parent's own
    list when it has one (`CUDA_VISIBLE_DEVICES=2,3`: the workers get 2 and 3, not 0 and 1),
    else the indices."""
    inherited = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
                 if d.strip()]
    return inherited[:gpus] if len(inherited) >= gpus else [str(i) for i in range(gpus)]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_workers(cells: list[Cell], runs_per_gpu: int) -> int:
    """Runs (or packs) at a time when --workers is not given: runs_per_gpu per GPU; on CPU as
    many as the CPUs hold at the cells' own thread counts (1 each by default in a study), and
    no more than there are cells (packs are split to fill the workers: `packs`)."""
    gpus = gpu_count()
    if gpus:
        return gpus * runs_per_gpu
    threads = max((c.config.cpu_threads or 1 for c in cells), default=1)
    return max(1, min(len(cells), (os.cpu_count() or 1) // threads))


class StudyProgressLines:
    """Without a terminal the study's bar is off: a log line every `PEFTLAB_PROGRESS_SECONDS`
    (default 30) instead, from a timer thread, so a long pack still shows the study is alive
    (a job log showed nothing for 8 minutes between the plan and the final count)."""

    def __init__(self, total: int, counts: dict[str, int], enabled: bool):
        self.total, self.counts = total, counts
        self.began = time.perf_counter()
        self.stopped = threading.Event()
        self.every = float(os.environ.get("PEFTLAB_PROGRESS_SECONDS", "30"))
        self.thread = threading.Thread(target=self._loop, daemon=True) if enabled else None
        if self.thread is not None:
            self.thread.start()

    def line(self) -> str:
        done = sum(self.counts.values())
        elapsed = time.perf_counter() - self.began
        eta = (self.total - done) * elapsed / done if done else None
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(self.counts.items()))
        return (f"study: {done}/{self.total} runs done" + (f" ({statuses})" if statuses else "")
                + f", {elapsed / 60:.1f} min so far, ETA "
                + (f"{eta / 60:.1f} min" if eta is not None else "-"))

    def _loop(self) -> None:
        while not self.stopped.wait(self.every):
            log.info(self.line())

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()


@dataclass
class Outcome:
    counts: dict[str, int]
    locked: list[str]  # "cell key: holder"


def execute(cells: list[Cell], workers: int = 1, backend: Literal["local", "ray"] = "local",
            address: str | None = None, runs_per_gpu: int = 1,
            progress: bool = True, pack: int = 1) -> Outcome:
    """Run the cells, in packs of up to `pack` (see `packs`): a worker, a Ray task or a GPU
    slot runs one pack at a time. Returns how many ended in each status, and the cells other
    processes held."""
    from tqdm.auto import tqdm

    counts: dict[str, int] = {}
    locked: list[str] = []
    bar = tqdm(total=len(cells), desc="study", unit="run", disable=not progress or None)
    lines = StudyProgressLines(len(cells), counts, enabled=progress and bar.disable)

    def done(cell: Cell, status: str) -> None:
        if status.startswith("locked: "):
            locked.append(f"{cell.key} ({status.removeprefix('locked: ')})")
            status = "locked"
        counts[status] = counts.get(status, 0) + 1
        bar.update(1)
        bar.set_postfix(counts)

    def arguments(group: list[Cell]) -> tuple:
        return ([c.config.model_dump() for c in group], [c.labels for c in group])

    def finished(group: list[Cell], statuses: list[str]) -> None:
        for cell, status in zip(group, statuses):
            done(cell, status)

    try:
        _execute_groups(packs(cells, pack, slots=workers if backend == "local" else 1),
                        workers, backend, address, runs_per_gpu, progress, arguments, finished)
    finally:
        bar.close()
        lines.stop()
    return Outcome(counts, locked)


def _execute_groups(groups: list[list[Cell]], workers: int, backend: str, address: str | None,
                    runs_per_gpu: int, progress: bool, arguments: Callable,
                    finished: Callable) -> None:
    """Each group (pack) on the backend: in this process, in worker processes, or on Ray."""
    if backend == "ray":
        _execute_ray(groups, address, runs_per_gpu, finished)
    elif workers <= 1:
        for group in groups:
            finished(group, run_cells(*arguments(group), progress=progress,
                                      pack_id=pack_name(group)))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")  # no forked torch state in the workers
        gpus = gpu_count()
        queue = None
        if gpus:
            queue = ctx.Queue()  # handed over at spawn: no manager process to outlive us
            visible = worker_gpus(gpus)
            for i in range(workers):
                queue.put(visible[i % gpus])  # runs_per_gpu workers per GPU
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, os.getpid())) as pool:
            futures = {pool.submit(run_cells, *arguments(g), pack_id=pack_name(g)): g
                       for g in groups}
            for future in as_completed(futures):
                finished(futures[future], future.result())


# What a run reads from its environment: a Ray worker started elsewhere must see the same
# (the data folder a config leaves to $PEFTLAB_DATA_DIR, offline switches, caches).
FORWARDED_ENV = ("PEFTLAB_DATA_DIR", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE")


def _execute_ray(groups: list[list[Cell]], address: str | None, runs_per_gpu: int,
                 finished: Any) -> None:
    try:
        import ray
    except ImportError:
        raise PeftlabError("--backend ray needs Ray: pip install 'peftlab[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        env = {k: os.path.abspath(v) if k == "PEFTLAB_DATA_DIR" else v
               for k in FORWARDED_ENV if (v := os.environ.get(k))}
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    gpus = ray.cluster_resources().get("GPU", 0)
    threads = max((c.config.cpu_threads or 1 for g in groups for c in g), default=1)
    remote = ray.remote(num_cpus=threads, num_gpus=(1 / runs_per_gpu) if gpus else 0)(run_cells)
    refs = {remote.remote([c.config.model_dump() for c in g], [c.labels for c in g],
                          pack_id=pack_name(g)): g for g in groups}
    pending_refs = list(refs)
    try:
        while pending_refs:
            ready, pending_refs = ray.wait(pending_refs, num_returns=1)
            finished(refs[ready[0]], ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()


def write_study_files(study: StudyConfig, cells: list[Cell], study_dir: Path) -> None:
    """The study as run, and its grid: what the report compares the run folders against."""
    write_yaml(study_dir / "study.yaml", study.model_dump())
    write_json(study_dir / "grid.json", [{"key": c.key, **c.labels} for c in cells])


def _wall_time(cell: Cell) -> float | None:
    try:
        value = read_json(Path(cell.config.output_dir) / SUMMARY).get("wall_time_s")
    except (PeftlabError, AttributeError):
        return None
    return value if isinstance(value, int | float) and value > 0 else None


def calibration_cells(todo: list[Cell], pack: int) -> list[Cell]:
    """The first pack (or run) of each task and method among the cells to run: run first,
    they give the measured times the projection of the rest needs (and are kept: they are
    cells of the study)."""
    chosen: dict[tuple[str, str], list[Cell]] = {}
    for group in packs(todo, pack):
        first = group[0].labels
        if first.get("learning_rate") is None:  # untuned, baselines: seconds, not worth it
            continue
        chosen.setdefault((first["task"], first["method_name"]), group)
    return [c for group in chosen.values() for c in group]


def describe(cells: list[Cell], todo: list[Cell], pack: int = 1, workers: int = 1) -> str:
    """The --dry-run text: runs per task and method, steps, packs, and a time estimate if
    possible."""
    lines = [f"{len(cells)} runs ({len(todo)} to run, {len(cells) - len(todo)} finished)"]
    if pack > 1:
        groups = packs(todo, pack, slots=workers)
        packed = [g for g in groups if len(g) > 1]
        sizes = sorted({len(g) for g in packed}, reverse=True)
        lines.append(f"packs of up to {pack}: {sum(map(len, packed))} of the runs to run in "
                     f"{len(packed)} packs (sizes {', '.join(map(str, sizes)) or '-'}), "
                     f"{len(groups) - len(packed)} alone")
    by: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        by.setdefault((c.labels["task"], c.labels["method_name"]), []).append(c)
    total_steps = 0
    measured: dict[tuple[str, str], float] = {}
    waiting = {c.key for c in todo}
    for (task, name), group in by.items():
        steps = sum(c.config.max_steps if c.labels["learning_rate"] else 0 for c in group)
        total_steps += steps
        walls = [w for c in group if c.key not in waiting and (w := _wall_time(c))]
        if walls:
            measured[(task, name)] = sum(walls) / len(walls)
        est = f", {measured[(task, name)]:.1f} s/run measured" if walls else ""
        lines.append(f"  {task:10s} {name:12s} {len(group):5d} runs  {steps:8d} steps{est}")
    lines.append(f"total optimizer steps: {total_steps}")
    todo_known = [c for c in todo if (c.labels["task"], c.labels["method_name"]) in measured]
    if todo_known:
        eta = sum(measured[(c.labels["task"], c.labels["method_name"])] for c in todo_known)
        lines.append(f"estimated time for {len(todo_known)} of the {len(todo)} pending runs "
                     f"(from finished ones: their mean wall time per task and method, a packed "
                     f"run's share of its pack): {eta / 3600:.2f} h on one worker"
                     + (f", about {eta / 3600 / workers:.2f} h with {workers} at a time"
                        if workers > 1 else ""))
    missing = sorted({(c.labels["task"], c.labels["method_name"]) for c in todo}
                     - set(measured))
    if missing and todo:
        lines.append(f"no measured time yet for {len(missing)} task/method pairs "
                     f"({', '.join('/'.join(m) for m in missing[:6])}"
                     f"{', ...' if len(missing) > 6 else ''}): `--calibrate` runs one pack or "
                     "run of each first and projects the rest")
    return "\n".join(lines)
