"""A study file: its schema (`StudyConfig`, one `MethodSpec` per method) and its expansion
into cells, one resolved run config and folder each."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
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

from peftlab.config import (
    RunConfig,
    format_validation_error,
    read_yaml_mapping,
    resolve_run_config,
)
from peftlab.errors import ConfigError, PeftlabError, unknown_name
from peftlab.methods import Baseline, get_method
from peftlab.tasks import build_task

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
            depends_on_sample = method.uses_training_sample
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
