"""Training checkpoints a killed run resumes from: safetensors and JSON only (no pickle).

A checkpoint is a folder `checkpoints/step-NNNNNN/` written completely before the pointer file
`checkpoints/latest.json` is atomically replaced to name it; older folders are then removed.
A kill at any moment leaves either the old checkpoint or the new one, never half of one.

Contents: the trainable parameters in their training form (e.g. the prefix MLP), the
optimizer state, the best state so far (export form), the torch RNG state, and a JSON file
with the step, the scheduler, the best step and metrics, and the early-stopping counter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from peftlab.errors import CheckpointError
from peftlab.files import save_tensors, write_json
from peftlab.records import CHECKPOINT_DIR, CHECKPOINTS, remove_checkpoint_step
from peftlab.records import CHECKPOINT_POINTER as POINTER


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    best_state: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    meta: dict[str, Any]  # scheduler, best_step, best_val, evals_without_gain, elapsed_s


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors for safetensors, everything else for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def write_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    """The checkpoint's folder, complete; nothing points to it yet."""
    folder = run_dir / CHECKPOINTS / f"step-{ckpt.step:06d}"
    if folder.exists():
        remove_checkpoint_step(folder)
    opt_tensors, opt_plain = _split_optimizer(ckpt.optimizer)
    save_tensors(folder / "trainable.safetensors", ckpt.trainable)
    save_tensors(folder / "optimizer.safetensors", opt_tensors)
    save_tensors(folder / "best.safetensors", ckpt.best_state)
    save_tensors(folder / "rng.safetensors", ckpt.rng)
    write_json(folder / "state.json", {"step": ckpt.step, "optimizer": opt_plain, **ckpt.meta})


def point_to(run_dir: Path, step: int) -> None:
    """Make `step` the run's latest checkpoint (one atomic file replace)."""
    write_json(run_dir / CHECKPOINTS / POINTER, {"folder": f"step-{step:06d}", "step": step})


def pointer_step(run_dir: Path) -> int | None:
    """The step the run's pointer names (None: no checkpoint, or an unreadable pointer)."""
    try:
        return int(json.loads((run_dir / CHECKPOINTS / POINTER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_steps_before(run_dir: Path, step: int) -> None:
    """Checkpoint folders of steps before `step` (never the one the pointer names)."""
    keep = pointer_step(run_dir)
    for old in (run_dir / CHECKPOINTS).glob("step-*"):
        if CHECKPOINT_DIR.fullmatch(old.name) and int(old.name[5:]) < step \
                and int(old.name[5:]) != keep:
            remove_checkpoint_step(old)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    """A run alone: the folder, then the pointer, then older folders go."""
    save_pack_checkpoints([(run_dir, ckpt)], [run_dir])


def save_pack_checkpoints(saved: list[tuple[Path, Checkpoint]], members: list[Path]) -> None:
    """A pack's checkpoint as one unit: every member's folder is written before any pointer
    moves, and a folder goes only once no member's pointer is older than it. A kill at any
    moment leaves the pack resumable at the oldest step any member points to, from which
    every member still has its folder (`resume_step`): the pack then goes on as it would
    have, members in step (their rows go through the same chunks)."""
    for run_dir, ckpt in saved:
        write_checkpoint(run_dir, ckpt)
    for run_dir, ckpt in saved:
        point_to(run_dir, ckpt.step)
    steps = [pointer_step(run_dir) for run_dir in members]
    if None in steps:
        return  # a member without a checkpoint: the pack would resume from step 0
    oldest = min(s for s in steps if s is not None)
    for run_dir in members:
        remove_steps_before(run_dir, oldest)


def load_checkpoint(run_dir: Path, step: int | None = None) -> Checkpoint | None:
    """The latest complete checkpoint (or the one of `step`, in a pack resuming its members
    at one step), or None if the run never wrote one."""
    pointer = run_dir / CHECKPOINTS / POINTER
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["folder"] if step is None \
            else f"step-{step:06d}"
        # only a checkpoint folder of this run: a pointer is never followed elsewhere
        if not isinstance(name, str) or not CHECKPOINT_DIR.fullmatch(name):
            raise ValueError(f"`folder` {name!r} is not a checkpoint folder of this run")
        folder = run_dir / CHECKPOINTS / name
        meta = json.loads((folder / "state.json").read_text())
        tensors = {name: load_file(str(folder / f"{name}.safetensors"))
                   for name in ("trainable", "optimizer", "best", "rng")}
        step = int(meta.pop("step"))
        optimizer = _join_optimizer(tensors["optimizer"], meta.pop("optimizer"))
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise CheckpointError(
            f"{pointer.parent}: unreadable checkpoint ({type(e).__name__}: {e})"
        ) from None
    return Checkpoint(step, tensors["trainable"], optimizer, tensors["best"], tensors["rng"], meta)


def rng_state() -> dict[str, torch.Tensor]:
    """The CPU generator's state and, if this process uses CUDA, its current device's. Not
    every visible GPU's: that opened a CUDA context on each (in a process pinned to none)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        return
    # checkpoints written before: one state per visible GPU, cuda0, cuda1, ... (numeric order:
    # cuda10 after cuda2)
    old = sorted((k for k in state if k.startswith("cuda") and k[4:].isdigit()),
                 key=lambda k: int(k[4:]))
    if old:
        torch.cuda.set_rng_state_all([state[k] for k in old])
