"""Task registry: a task is added with one module (an `Args` schema and `build`) and one line."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from peftlab.errors import unknown_name
from peftlab.tasks import custom, samsum, sst2
from peftlab.tasks.base import (
    ClassificationTask,
    Example,
    GenerationTask,
    Splits,
    Task,
    TaskData,
    prepare_splits,
)
from peftlab.tasks.readers import file_stamp, track_reads

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
    task.load = _reloading_cache(task.load)
    return task


def _reloading_cache(load: Callable[[], TaskData]) -> Callable[[], TaskData]:
    """`load` once, again only when a file it read has changed (size or modification time)."""
    cached: dict[str, Any] = {}

    def wrapper() -> TaskData:
        stamps = cached.get("stamps")
        if stamps is not None and all(file_stamp(p) == st for p, st in stamps.items()):
            return cached["data"]
        with track_reads() as seen:
            data = load()
        cached.update(data=data, stamps={p: file_stamp(p) for p in seen})
        return data

    return wrapper


__all__ = [
    "ClassificationTask", "Example", "GenerationTask", "Splits", "Task", "TASKS",
    "build_task", "get_task", "prepare_splits",
]
