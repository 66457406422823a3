"""Experiment trackers a run also logs to (`log_to:`), beside its own files.

The run folder stays the record (the report reads only it); a tracker gets a copy: the
resolved config, every metrics row as it is written, the summary at the end, and in a study
the cell's labels. Each tracker is an optional extra, imported only when a run asks for it.

TensorBoard: event files in `OUTPUT_DIR/tensorboard` (`tensorboard --logdir studies/NAME`
shows every run of a study). A resumed run purges the events logged after its checkpoint,
as it drops those metrics rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from peftlab.errors import ConfigError
from peftlab.records import TENSORBOARD

TRACKERS = ("tensorboard",)
EXTRA = {"tensorboard": "tensorboard"}


class Tracker(Protocol):
    def row(self, row: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


def check_available(names: list[str]) -> None:
    """At config time: a tracker whose package is missing names the extra to install."""
    for name in names:
        try:
            if name == "tensorboard":
                import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(f"`log_to: {name}` needs its package: pip install "
                              f"'peftlab[{EXTRA[name]}]'") from None


class TensorBoard:
    """Scalars under `train/`, `val/`, `test/`; config, labels and summary as text."""

    def __init__(self, folder: Path, config: dict[str, Any], labels: dict[str, Any] | None,
                 resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None
                                    else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", _code(config))
            if labels:
                self.writer.add_text("labels", _code(labels))

    def row(self, row: dict[str, Any]) -> None:
        step = row["step"]
        for key, value in row.items():
            if key == "step" or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in (summary.get("test_metrics") or {}).items():
            self.writer.add_scalar(f"test/{key}", value, summary.get("best_step", 0))
        self.writer.add_text("summary", _code({k: v for k, v in summary.items()
                                               if k not in ("versions",)}))
        self.writer.close()


def _code(value: Any) -> str:
    return "```\n" + json.dumps(value, indent=2, default=str) + "\n```"


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any],
                  labels: dict[str, Any] | None, resume_step: int | None) -> list[Tracker]:
    check_available(names)
    out: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoard(run_dir / TENSORBOARD, config, labels, resume_step))
    return out
