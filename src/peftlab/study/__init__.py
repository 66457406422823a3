"""A study: a grid of runs (tasks x methods x sizes x train sizes x learning rates x seeds).

The runner knows nothing about methods: it expands the study file into run configs, gives
each its own folder, and runs the ones without a `summary.json`, each under a lock, in this
process, in worker processes, or as Ray tasks. Killing it at any moment loses nothing: the
next start skips finished runs and resumes unfinished ones from their checkpoints.

  spec.py      the study file's schema and its expansion into cells
  planning.py  what each folder holds (the plan), packs, the dry run's description
  runner.py    running the cells: locks, packs, workers, Ray
`peftlab.api.run_study` composes them.
"""

from peftlab.study.planning import (
    Plan,
    apply,
    calibration_cells,
    clean_finished,
    describe,
    pack_name,
    packs,
    pending,
    plan,
    write_study_files,
)
from peftlab.study.runner import (
    Outcome,
    StudyProgressLines,
    default_workers,
    execute,
    run_cells,
)
from peftlab.study.spec import (
    Cell,
    MethodSpec,
    StudyConfig,
    expand,
    load_study,
    preset_names,
    study_config,
)

__all__ = [
    "Cell", "MethodSpec", "Outcome", "Plan", "StudyConfig", "StudyProgressLines", "apply",
    "calibration_cells", "clean_finished", "default_workers", "describe", "execute", "expand",
    "load_study", "pack_name", "packs", "pending", "plan", "preset_names", "run_cells",
    "study_config", "write_study_files",
]
