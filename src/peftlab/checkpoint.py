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


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    root = run_dir / CHECKPOINTS
    folder = root / f"step-{ckpt.step:06d}"
    if folder.exists():
        remove_checkpoint_step(folder)
    opt_tensors, opt_plain = _split_optimizer(ckpt.optimizer)
    save_tensors(folder / "trainable.safetensors", ckpt.trainable)
    save_tensors(folder / "optimizer.safetensors", opt_tensors)
    save_tensors(folder / "best.safetensors", ckpt.best_state)
    save_tensors(folder / "rng.safetensors", ckpt.rng)
    write_json(folder / "state.json", {"step": ckpt.step, "optimizer": opt_plain, **ckpt.meta})
    write_json(root / POINTER, {"folder": folder.name, "step": ckpt.step})
    for old in root.glob("step-*"):
        if old.name != folder.name and CHECKPOINT_DIR.fullmatch(old.name):
            remove_checkpoint_step(old)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The latest complete checkpoint, or None if the run never wrote one."""
    pointer = run_dir / CHECKPOINTS / POINTER
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["folder"]
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
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
