"""Typed run config: YAML file + `--set key=value` overrides, validated, unknown keys rejected.

`load_run_config` returns a `RunConfig` whose `method_args` and `task_args` are already
validated against the chosen method's and task's own schemas and filled with their defaults,
so that the `config.yaml` written beside every run is the complete, resolved config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from peftlab.errors import ConfigError, did_you_mean
from peftlab.limits import MAX_BEAMS, MAX_TOKENS
from peftlab.records import flat_keys

DEFAULT_MODEL = "google/flan-t5-small"


class RunConfig(BaseModel):
    """Everything that defines one run. Each field's description is its help text."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL, description="HF hub id, local folder, or preset name")
    tokenizer: str | None = Field(None, description="HF hub id or local folder; default: model's")
    task: str = Field("sst2", description="task name (sst2, samsum, custom)")
    task_args: dict[str, Any] = Field(default_factory=dict, description="the task's own settings")
    method: str = Field("lora", description="adaptation method name")
    method_args: dict[str, Any] = Field(default_factory=dict, description="the method's settings")
    train_size: int | Literal["all"] = Field(64, description="training examples drawn with seed")
    val_size: int | Literal["all"] = Field(200, description="validation examples (fixed draw)")
    test_size: int | Literal["all"] = Field("all", description="test examples; 'all' for papers")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="64-bit, as torch takes it")
    learning_rate: float | None = Field(None, gt=0, description="None: the method's default")
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    group_by_length: bool = Field(
        True, description="batch examples of similar length (less padding); false: random batches"
    )
    max_steps: int = Field(200, ge=0, description="optimizer steps")
    warmup_ratio: float = Field(0.06, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1, description="evaluate on validation every N steps")
    log_every: int = Field(10, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1, description="evaluations")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="training: auto = bf16 autocast on GPU, fp32 on CPU"
    )
    eval_precision: Literal["fp32", "bf16-validation", "bf16"] = Field(
        "fp32", description="evaluation: fp32 = every evaluation in fp32, so checkpoints, "
        "rates and sizes are chosen on the numbers the test split reports; bf16-validation = "
        "validation on a bf16 copy (faster where bf16 is native; it can change what is "
        "selected, docs/speed.md), the test split in fp32; bf16 = both in bf16"
    )
    dropout: float | None = Field(
        None, ge=0, lt=1, description="the base model's dropout rate (every dropout layer and "
        "attention-probability dropout; T5's `dropout_rate`). None: the checkpoint's (Flan-T5: "
        "0.1); 0 makes training deterministic given the batches"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = Field(
        64, ge=1, description="sequences per evaluation batch (rank classification: inputs "
        "times label words); 64 ran the SST-2 test split 1.2x faster than 32 on CPU"
    )
    max_source_length: int | None = Field(None, ge=1, le=MAX_TOKENS,
                                          description="None: the task's default")
    max_target_length: int | None = Field(None, ge=1, le=MAX_TOKENS,
                                          description="None: the task's default")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS,
                                       description="None: the task's default")
    num_beams: int = Field(1, ge=1, le=MAX_BEAMS, description="1: greedy decoding")
    label_scoring: Literal["sum", "mean"] = Field(
        "sum", description="rank classification: a label's score is the log-probability of "
        "its tokens and its end-of-sequence token, summed (sum) or averaged per token (mean)"
    )
    generate_on_validation: bool = Field(
        False, description="classification: also generate at each evaluation (test always does)"
    )
    selection_metric: str | None = Field(None, description="None: the task's primary metric")
    cpu_threads: int | None = Field(
        None, ge=1, description="CPU threads of this run's kernels, part of the config because "
        "the thread count changes floating-point sums (results would depend on how many runs "
        "share the machine). None: every CPU for `peftlab train`; 1 per run in a study"
    )
    log_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        default_factory=list, description="experiment trackers that also get the config, "
        "every metrics row and the summary, in the run folder (trackio: in its own store); "
        "an optional extra each: pip install 'peftlab[tensorboard]' (or mlflow, wandb, trackio)"
    )
    output_dir: str = "runs/run"

    @field_validator("train_size", "val_size", "test_size")
    @classmethod
    def _positive_size(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive number of examples or 'all'")
        return v


def parse_set(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value parsed as a YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"--set `{item}`: expected key=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set `{item}`: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set `{item}`: cannot parse value: {e}") from None
    return key.strip().split("."), value


def apply_sets(raw: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    for item in sets:
        path, value = parse_set(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set `{item}`: `{part}` is not a mapping")
            node = child
        node[path[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently: `max_steps: 3` then `max_steps: 1` ran 1 step)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in first:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {first[key] + 1})",
                key_node.start_mark)
        first[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def format_validation_error(err: ValidationError, prefix: str = "", schema: Any = None) -> str:
    """One line per problem: `field.path: message`, with did-you-mean for unknown keys."""
    lines = []
    known = list(schema.model_fields) if schema is not None else []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        field = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key `{field}`{did_you_mean(str(e['loc'][-1]), known)}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"`{field}`: {e['msg']}{shown}")
    return "; ".join(lines)


def validate_args(schema: type[BaseModel], args: dict[str, Any], prefix: str) -> BaseModel:
    """Validate a method's or task's own settings against its schema."""
    if not isinstance(args, dict):
        raise ConfigError(f"`{prefix.rstrip('.')}` must be a mapping, got {type(args).__name__}")
    try:
        return schema.model_validate(args)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix, schema)) from None


def load_run_config(path: str | Path | None = None, sets: list[str] | None = None) -> RunConfig:
    """Read, override, validate and resolve a run config (defaults filled in everywhere)."""
    raw = read_yaml_mapping(path) if path is not None else {}
    return resolve_run_config(apply_sets(raw, sets or []))


def resolve_run_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping and fill every default (method's, task's, tokenizer's)."""
    # Imported here, not above: the schema alone (`peftlab train --help` lists it) must not
    # load torch and transformers with the methods (0.2 s against 5 s to start the CLI).
    from peftlab.families import family as model_family
    from peftlab.methods import Baseline, get_method
    from peftlab.models import default_tokenizer_for
    from peftlab.tasks import get_task
    from peftlab.trackers import check_available

    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "", RunConfig)) from None
    method = get_method(cfg.method)
    task = get_task(cfg.task)
    defaults: dict[str, Any] = {}
    if not isinstance(method, Baseline):  # a baseline reads no model
        family = model_family(cfg.model)
        method.check_family(family, cfg.model)
        defaults = method.defaults_for(family)
    method_args = validate_args(method.Args, {**defaults, **cfg.method_args}, "method_args.")
    task_args = validate_args(task.Args, cfg.task_args, "task_args.")
    updates: dict[str, Any] = {
        "method_args": method_args.model_dump(),
        "task_args": task_args.model_dump(),
    }
    if cfg.learning_rate is None:
        updates["learning_rate"] = method.default_learning_rate
    built = task.build(task_args)  # cheap: data is read only when the run starts
    for key in ("max_source_length", "max_target_length", "max_new_tokens"):
        if getattr(cfg, key) is None:
            updates[key] = getattr(built, key)
    updates["selection_metric"] = cfg.selection_metric or built.primary_metric
    valid = {"loss", built.primary_metric, *built.selectable_metrics}
    if updates["selection_metric"] not in valid:
        raise ConfigError(f"`selection_metric`: {updates['selection_metric']!r} is not one of "
                          f"{sorted(valid)}{did_you_mean(updates['selection_metric'], valid)}")
    if cfg.tokenizer is None:
        updates["tokenizer"] = default_tokenizer_for(cfg.model)
    if cfg.cpu_threads is None:
        updates["cpu_threads"] = os.cpu_count() or 1
    # Every path absolute: a run may be carried out elsewhere (a Ray worker started in another
    # folder) and its record must say which files it used.
    updates["output_dir"] = os.path.abspath(cfg.output_dir)
    for key in ("model", "tokenizer"):
        value = updates.get(key, getattr(cfg, key))
        if value and Path(value).exists():
            updates[key] = os.path.abspath(value)
    absolute = getattr(task, "absolute_paths", None)
    if absolute is not None:
        updates["task_args"] = absolute(task_args).model_dump()
    if cfg.log_to:
        check_available(cfg.log_to)  # a missing package names its extra, before anything runs
    return cfg.model_copy(update=updates)


# Where a run's files are, not what it computes: a study moved to another folder, or data
# reached by another path, is the same study.
LOCATION_KEYS = ("output_dir", "task_args.data_dir", "log_to")  # log_to: where copies go


def config_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs (locations aside)."""
    a, b = flat_keys(previous), flat_keys(current)
    missing = object()
    def same(k: str) -> bool:
        # a setting added in a later version, absent from an older record, at its default of
        # None (which keeps the old behaviour), is no change
        x, y = a.get(k, missing), b.get(k, missing)
        return x == y or (x is missing and y is None) or (x is None and y is missing)

    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
            for k in sorted(set(a) | set(b)) if k not in LOCATION_KEYS and not same(k)]


