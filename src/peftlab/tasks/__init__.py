"""Task registry: a task is added with one module (an `Args` schema and `build`) and one line."""

from __future__ import annotations

import functools
import json
import os
from types import ModuleType

from peftlab.errors import unknown_name
from peftlab.tasks import custom, samsum, sst2
from peftlab.tasks.base import (
    ClassificationTask,
    Example,
    GenerationTask,
    Splits,
    Task,
    prepare_splits,
)

TASKS: dict[str, ModuleType] = {"sst2": sst2, "samsum": samsum, "custom": custom}


def get_task(name: str) -> ModuleType:
    """The task's module: `Args` (its settings) and `build(args) -> Task`."""
    if name not in TASKS:
        raise unknown_name("task", name, TASKS)
    return TASKS[name]


def build_task(name: str, args: dict) -> Task:
    """The task, with its data read once per process for the same settings.

    A study runs hundreds of runs on the same files: parsing GLUE train (67k rows) took
    longer than a smoke run's training did.
    """
    return _build_cached(name, json.dumps(args, sort_keys=True), os.environ.get("PEFTLAB_DATA_DIR"))


@functools.lru_cache(maxsize=16)
def _build_cached(name: str, args_json: str, data_dir_env: str | None) -> Task:
    module = get_task(name)
    task = module.build(module.Args.model_validate(json.loads(args_json)))
    task.load = functools.cache(task.load)
    return task


__all__ = [
    "ClassificationTask", "Example", "GenerationTask", "Splits", "Task", "TASKS",
    "build_task", "get_task", "prepare_splits",
]
