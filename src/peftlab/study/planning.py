"""What a study does before it runs: what each cell's folder already holds (the plan),
which cells share a pack, and the dry run's description and time estimate."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from peftlab.config import config_changes, read_yaml_mapping
from peftlab.errors import ConfigError, PeftlabError
from peftlab.files import write_json, write_yaml
from peftlab.locks import run_lock
from peftlab.packing import pack_key, packable
from peftlab.records import (
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
from peftlab.study.spec import Cell, StudyConfig


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
        finished = (folder / SUMMARY).exists()
        # a finished record that cannot be trusted, or an unfinished run whose settings cannot
        # be known: start afresh
        problem = record_problem(folder) if finished else _unreadable_config(folder)
        if problem:
            out.corrupt.append((cell, problem))
            out.todo.append(cell)
            continue
        diff = _changes(folder, cell)
        if diff:
            out.changed.append((cell, diff))
        if diff or not finished:
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


def packs(cells: list[Cell], size: int, slots: int = 1) -> list[list[Cell]]:
    """The cells in packs of up to `size`: cells whose runs may train together (same task,
    model, method and size, schedule; any seed, learning rate and train size) and whose
    method can be packed; every other cell alone. A group larger than `size` is split evenly
    (9 cells in packs of up to 8: 5 and 4, not 8 and a run alone). Fewer packs than `slots`
    (workers) would leave workers idle: the largest packs are halved until each has one (8
    cells on 2 CPUs in packs of up to 8: two packs of 4, where one pack of 8 ran 1.2x slower
    on one CPU with the other idle). In grid order (a pack where its first cell is)."""
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


def describe(cells: list[Cell], todo: list[Cell], pack: int = 1, workers: int = 1,
             groups: list[list[Cell]] | None = None) -> str:
    """The --dry-run text: runs per task and method, steps, packs (`groups`: the packs the
    runner will run, if already made), and a time estimate if possible."""
    lines = [f"{len(cells)} runs ({len(todo)} to run, {len(cells) - len(todo)} finished)"]
    if pack > 1:
        groups = groups if groups is not None else packs(todo, pack, slots=workers)
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
