"""Task registry: a task is added with one module (an `Args` schema and `build`) and one line."""

from __future__ import annotations

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
    module = get_task(name)
    return module.build(module.Args.model_validate(args))


__all__ = [
    "ClassificationTask", "Example", "GenerationTask", "Splits", "Task", "TASKS",
    "build_task", "get_task", "prepare_splits",
]
