"""peftlab from Python (a notebook): train a run, run a study, load what they left.

    import peftlab
    run = peftlab.train({"model": "t5-tiny", "task": "sst2", "method": "lora",
                         "output_dir": "runs/lora"})
    run.metrics            # every logged step, a pandas DataFrame
    model, tokenizer = run.model()
    study = peftlab.run_study(preset="smoke", out="studies/smoke")
    study.runs, study.headline, study.significance

The same engine as the command line, which is a thin layer on these functions: a study run
here and one run by `peftlab run` write the same folders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from peftlab import study as st
from peftlab.adapters import export_run
from peftlab.adapters import load_adapter as load
from peftlab.config import RunConfig, load_run_config, read_yaml_mapping, resolve_run_config
from peftlab.errors import PeftlabError
from peftlab.records import CONFIG, METRICS, PREDICTIONS, SUMMARY, read_json, read_jsonl_checked
from peftlab.report import study_tables, write_report
from peftlab.run import restore, run

log = logging.getLogger("peftlab")


@dataclass
class Run:
    """A run folder: its resolved config, summary, metrics rows and test predictions."""

    path: Path
    config: RunConfig
    summary: dict[str, Any]

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per logged or evaluated step (step 0 included)."""
        return pd.DataFrame(read_jsonl_checked(self.path / METRICS))

    @property
    def predictions(self) -> pd.DataFrame:
        """One row per test example: id, reference, prediction, scores."""
        return pd.DataFrame(read_jsonl_checked(self.path / PREDICTIONS))

    def model(self) -> tuple[Any, Any]:
        """The model with the run's selected state loaded (inference form), and its tokenizer:
        `model.generate(**tokenizer(text, return_tensors="pt"))`."""
        s = restore(self.path)
        if s.model is None:
            raise PeftlabError(f"{self.path}: a `{self.config.method}` run has no model")
        return s.model.eval(), s.tokenizer


def export(run: str | Path | Run, to: str | Path, merge: bool = False,
           force: bool = False) -> Path:
    """The run's trained state as a peft adapter folder (`PeftModel.from_pretrained` loads
    it), peftlab's own folder for prefix and layer-norm tuning (`load_adapter`), or with
    `merge` a full model folder (LoRA, (IA)^3, LN). Unfinished and failed runs are refused,
    diverged ones unless `force`. See peftlab.adapters."""
    return export_run(run.path if isinstance(run, Run) else run, to, merge, force)


def load_adapter(folder: str | Path) -> tuple[Any, Any]:
    """A prefix or layer-norm adapter `export` wrote: (model, tokenizer)."""
    return load(folder)


def load_run(path: str | Path) -> Run:
    """A finished run folder (`summary.json` present)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise PeftlabError(f"{path}: not a run folder (no {CONFIG})")
    if not (path / SUMMARY).is_file():
        raise PeftlabError(f"{path}: the run has not finished (no {SUMMARY})")
    return Run(path, load_run_config(path / CONFIG), read_json(path / SUMMARY))


def train(config: RunConfig | dict[str, Any] | str | Path | None = None, *,
          overwrite: bool = False, progress: bool = True, **settings: Any) -> Run:
    """Train one run (resuming an unfinished one in its folder) and return it.

    `config`: a RunConfig, a mapping of settings, or a run config YAML file; `settings`
    override it by name (`train("run.yaml", method="prefix", learning_rate=3e-3)`).
    """
    if isinstance(config, RunConfig):
        raw = config.model_dump()
    elif isinstance(config, dict):
        raw = dict(config)
    elif isinstance(config, str | Path):
        raw = read_yaml_mapping(config)
    elif config is None:
        raw = {}
    else:
        raise PeftlabError(f"train: `config` is a RunConfig, a mapping of settings or a YAML "
                           f"file's path, not {type(config).__name__} ({config!r:.60})")
    for name in ("method", "task"):  # another method's (task's) settings do not carry over
        if name in settings and settings[name] != raw.get(name) and f"{name}_args" not in settings:
            raw.pop(f"{name}_args", None)
    cfg = resolve_run_config({**raw, **settings})
    summary = run(cfg, progress=progress, overwrite=overwrite)
    return Run(Path(cfg.output_dir), cfg, summary)  # what it wrote, not read back


@dataclass
class Study:
    """A study folder: every run as one DataFrame, and the report's tables."""

    path: Path
    counts: dict[str, int] = field(default_factory=dict)  # this call's run statuses
    locked: list[str] = field(default_factory=list)  # cells other processes held

    def _tables(self) -> Any:
        return study_tables(self.path)

    @property
    def runs(self) -> pd.DataFrame:
        """Every run folder of the study (`report/runs.csv`)."""
        return self._tables().runs.drop(columns=["error"], errors="ignore")

    @property
    def headline(self) -> pd.DataFrame:
        """Test mean, spread and interval per task, method, size and training-set size, at
        the learning rate chosen on validation (`report/headline.csv`)."""
        return self._tables().headline.drop(columns=["keys", "run_seeds", "run_scores"],
                                            errors="ignore")

    @property
    def significance(self) -> pd.DataFrame:
        """Every pair of configurations compared (`report/significance.csv`)."""
        return self._tables().significance

    def run(self, key: str) -> Run:
        """One cell's run, by its folder relative to the study (`sst2/lora/n64/lr0.001/seed0`)."""
        parts = Path(key).parts
        if (not parts or Path(key).is_absolute() or any(p in ("..", ".") for p in parts)
                or not (self.path / key).resolve().is_relative_to(self.path.resolve())):
            raise PeftlabError(f"{key!r}: not a run of the study {self.path}; a key is a run "
                               "folder inside it, e.g. sst2/lora/n64/lr0.001/seed0")
        return load_run(self.path / key)

    def report(self) -> dict[str, Path]:
        """Write report.md, report.html, the CSV tables and the figures."""
        return write_report(self.path)


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_dir():
        raise PeftlabError(f"{path}: folder not found")
    return Study(path)


def check_study_options(*, workers: int | None, pack: int | None, runs_per_gpu: int,
                        backend: str) -> None:
    """The study runner's options, checked once for the command line and Python alike."""
    for name, value in (("workers", workers), ("pack", pack), ("runs_per_gpu", runs_per_gpu)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise PeftlabError(f"`{name}` must be a whole number of at least 1, got {value!r}")
    if backend not in ("local", "ray"):
        raise PeftlabError(f"`backend` must be local or ray, got {backend!r}")


def run_study(study: str | Path | dict[str, Any] | None = None, *, preset: str | None = None,
              out: str | Path | None = None, workers: int | None = None, pack: int | None = None,
              runs_per_gpu: int = 1, backend: str = "local", address: str | None = None,
              retry_failed: bool = False, rerun_changed: bool = False, report: bool = True,
              progress: bool = True, dry_run: bool = False, calibrate: bool = False,
              say: Callable[[str], None] = log.info,
              warn: Callable[[str], None] = log.warning) -> Study:
    """Run a study (a file, a mapping, or a built-in `preset`) into `out` (default
    studies/NAME): every cell of its grid, skipping finished runs and resuming unfinished
    ones, then write its report. `say` receives what the command line prints (the grid, its
    cost and packs), `warn` the cells whose records are corrupt or whose settings changed;
    `dry_run` stops there; `calibrate` runs the first pack (or run) of each task and method,
    then says the projected time of the rest, and stops."""
    check_study_options(workers=workers, pack=pack, runs_per_gpu=runs_per_gpu, backend=backend)
    config = st.study_config(study) if isinstance(study, dict) else st.load_study(study, preset)
    folder = Path(out) if out is not None else Path("studies") / config.name
    cells = st.expand(config, folder)
    plan = st.plan(cells, retry_failed, rerun_changed)
    for message in plan.messages():
        warn(message)
    pack_size = pack if pack is not None else config.pack
    n_workers = workers or st.default_workers(plan.todo, runs_per_gpu)
    # the packs the runner runs (on Ray each is one task), made once: shown, then run
    groups = st.packs(plan.todo, pack_size, slots=n_workers if backend == "local" else 1)
    if not calibrate:
        say(st.describe(cells, plan.todo, pack_size, n_workers, groups))
    if dry_run:
        return Study(folder)
    st.apply(plan)
    kept = st.clean_finished(cells)
    if kept:
        say(f"removed the training checkpoints that {len(kept)} finished runs kept (a kill "
            f"before their cleanup): {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}")
    st.write_study_files(config, cells, folder)
    if calibrate:
        first = st.calibration_cells(plan.todo, pack_size)
        say(f"calibrating: {len(first)} runs (the first pack or run of each task and method)")
        outcome = st.execute(first, min(n_workers, len(first)) or 1, backend, address,
                             runs_per_gpu, progress=progress, pack=pack_size)
        say(st.describe(cells, st.plan(cells, retry_failed).todo, pack_size, n_workers))
        return Study(folder, outcome.counts, outcome.locked)
    if len(plan.todo) > 1 and backend == "local":
        packed = [g for g in groups if len(g) > 1]
        alone = len(groups) - len(packed)
        how = (f": {sum(map(len, packed))} in {len(packed)} packs, {alone} alone"
               if packed else "")
        say(f"{len(plan.todo)} runs{how}, {n_workers} at a time")
    outcome = st.execute(plan.todo, n_workers, backend, address, runs_per_gpu,
                         progress=progress, pack=pack_size, groups=groups)
    result = Study(folder, outcome.counts, outcome.locked)
    if report:
        result.report()
    return result
