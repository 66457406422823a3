"""The training loop: one function, read top to bottom.

Evaluate at step 0 (the untrained reference) and every `eval_every` steps; keep the state
with the best validation metric; checkpoint after each evaluation so that a killed run
resumes exactly; stop on a non-finite loss (status `diverged`) or when validation stops
improving (`early_stopping_patience`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.optimization import Adafactor

from peftlab.checkpoint import Checkpoint, rng_state, set_rng_state
from peftlab.config import RunConfig
from peftlab.data import Features, training_batches
from peftlab.denormals import flushed_denormals
from peftlab.dropout import rand_mask_dropout
from peftlab.errors import CheckpointError
from peftlab.methods import Method
from peftlab.pack import step_gradients


@dataclass
class TrainOutcome:
    status: str  # "completed" or "diverged"
    best_step: int
    best_val: dict[str, float]
    best_state: dict[str, torch.Tensor]
    stopped_early: bool = False
    steps_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        # Fixed learning rate (no relative step), as in the prompt-tuning paper.
        return Adafactor(params, lr=cfg.learning_rate, relative_step=False,
                         scale_parameter=False, warmup_init=False, weight_decay=cfg.weight_decay)
    # fused: one vectorised kernel over all parameters instead of a dozen tensor ops each.
    # On CPU it took full fine-tuning's optimizer step from 0.40 s to 0.07 s (issue 4).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warmup to the peak rate, then linear decay to zero at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore_checkpoint(ckpt: Checkpoint, named: list[tuple[str, nn.Parameter]],
                       optimizer: torch.optim.Optimizer | None, scheduler: Any) -> None:
    """Load a checkpoint into the run, after checking that it fits: every trainable tensor
    present with its shape, optimizer state of the parameters' shapes, a usable RNG state.
    What does not fit raises CheckpointError (the run then starts again from step 0)."""
    def unfit(reason: str) -> CheckpointError:
        return CheckpointError(f"the checkpoint at step {ckpt.step} does not fit this run: {reason}")

    expected = {name: tuple(p.shape) for name, p in named}
    found = {name: tuple(t.shape) for name, t in ckpt.trainable.items()}
    if set(found) != set(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise unfit(f"tensors missing {missing[:3]}, unexpected {extra[:3]}")
    wrong = [n for n in expected if found[n] != expected[n]]
    if wrong:
        raise unfit(f"`{wrong[0]}` has shape {found[wrong[0]]}, the run's {expected[wrong[0]]}")
    for index, state in ckpt.optimizer.get("state", {}).items():
        for key, value in state.items():
            if not (isinstance(index, int) and 0 <= index < len(named)):
                raise unfit(f"optimizer state for parameter {index!r}, of {len(named)}")
            shape = expected[named[index][0]]
            if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) != shape:
                raise unfit(f"optimizer `{key}` of `{named[index][0]}` has shape "
                            f"{tuple(value.shape)}, the parameter {shape}")
    rng_before = rng_state()
    try:
        set_rng_state(ckpt.rng)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.meta["scheduler"])
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:
        set_rng_state(rng_before)
        raise unfit(f"{type(e).__name__}: {e}") from None
    with torch.no_grad():
        for name, p in named:
            p.copy_(ckpt.trainable[name])


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if higher_is_better else value < best


@flushed_denormals()
def train(
    model: nn.Module,
    method: Method,
    cfg: RunConfig,
    features: Features,
    evaluate_val: Callable[[], dict[str, float]],
    log_row: Callable[[dict[str, Any]], None],
    selection: tuple[str, bool],
    device: torch.device,
    bf16: bool,
    pad_id: int,
    progress: bool = True,
    resume: Checkpoint | None = None,
    save: Callable[[Checkpoint], None] | None = None,
) -> TrainOutcome:
    metric, higher_is_better = selection
    # the run's trainable tensors, as a pack of one holds them (peftlab.pack): a packed run
    # and an unpacked one take the same steps
    pack = getattr(model, "peftlab_pack", None)
    named = pack.parameters(0) if pack is not None else []
    params = [p for _, p in named]
    optimizer = make_optimizer(cfg, params) if params else None
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    scheduler = linear_schedule(optimizer, warmup, cfg.max_steps) if optimizer else None

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in method.export_state(model).items()}

    def timed_val() -> tuple[dict[str, float], float]:
        # each evaluation's seconds go in its row: what validation costs a run is then on record
        began = time.perf_counter()
        val = evaluate_val()
        return val, time.perf_counter() - began

    if resume is None:
        # --- step 0: the untrained model is the first point of every curve
        start = time.perf_counter()
        val, eval_s = timed_val()
        out = TrainOutcome("completed", 0, val, snapshot())
        log_row({"step": 0, "train_loss": None, **{f"val_{k}": v for k, v in val.items()},
                 "lr": scheduler.get_last_lr()[0] if scheduler else None,
                 "elapsed_s": time.perf_counter() - start, "examples_per_s": None,
                 "eval_s": eval_s})
        first_step, evals_without_gain = 1, 0
    else:
        # --- continue exactly where the checkpoint left off: weights, optimizer, schedule, RNG
        restore_checkpoint(resume, named, optimizer, scheduler)
        start = time.perf_counter() - resume.meta["elapsed_s"]
        out = TrainOutcome("completed", resume.meta["best_step"], resume.meta["best_val"],
                           resume.best_state, steps_done=resume.step)
        first_step, evals_without_gain = resume.step + 1, resume.meta["evals_without_gain"]
        if cfg.early_stopping_patience and evals_without_gain >= cfg.early_stopping_patience:
            out.stopped_early = True  # it had stopped at this checkpoint: it stays stopped
            return out
    if optimizer is None or cfg.max_steps == 0:
        return out

    model.train()
    with rand_mask_dropout(model, enabled=device.type == "cpu"):  # see peftlab.dropout
        batches = training_batches(features, cfg.batch_size, cfg.seed, pad_id,
                                   skip=(first_step - 1) * cfg.grad_accum_steps,
                                   group_by_length=cfg.group_by_length)
        window_loss, window_examples, window_start = 0.0, 0, time.perf_counter()
        bar = tqdm(total=cfg.max_steps, initial=first_step - 1, desc="train", leave=False,
                   disable=not progress or None)
        for step in range(first_step, cfg.max_steps + 1):
            # --- one optimizer step over grad_accum_steps micro-batches
            micro_batches = [next(batches) for _ in range(cfg.grad_accum_steps)]
            step_loss = step_gradients(pack, [micro_batches], device, bf16, pad_id)[0]
            window_examples += sum(len(b["input_ids"]) for b in micro_batches)
            if not math.isfinite(step_loss):
                out.status, out.steps_done = "diverged", step
                log_row({"step": step, "train_loss": step_loss, "lr": scheduler.get_last_lr()[0],
                         "elapsed_s": time.perf_counter() - start, "examples_per_s": None})
                break
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            method.on_step(model, step)
            out.steps_done = step
            window_loss += step_loss
            bar.update(1)

            # --- log and evaluate; one metrics row per step that has either
            row: dict[str, Any] = {}
            if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps:
                steps_in_window = step - (out.history[-1]["step"] if out.history else first_step - 1)
                now = time.perf_counter()
                row = {"step": step, "train_loss": window_loss / max(steps_in_window, 1), "lr": lr,
                       "elapsed_s": now - start,
                       "examples_per_s": window_examples / max(now - window_start, 1e-9)}
                window_loss, window_examples = 0.0, 0
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                val, row["eval_s"] = timed_val()
                row.update({f"val_{k}": v for k, v in val.items()})
                row["elapsed_s"] = time.perf_counter() - start
                if is_better(val[metric], out.best_val.get(metric), higher_is_better):
                    out.best_step, out.best_val, out.best_state = step, val, snapshot()
                    evals_without_gain = 0
                else:
                    evals_without_gain += 1
            if row:
                log_row(row)
                out.history.append(row)
                window_start = time.perf_counter()
            if save is not None and step % cfg.eval_every == 0 and step < cfg.max_steps:
                # --- checkpoint after each evaluation (the final step needs none: the run ends)
                save(Checkpoint(
                    step, {n: p.detach().cpu() for n, p in named}, optimizer.state_dict(),
                    out.best_state, rng_state(),
                    {"scheduler": scheduler.state_dict(), "best_step": out.best_step,
                     "best_val": out.best_val, "evals_without_gain": evals_without_gain,
                     "elapsed_s": time.perf_counter() - start},
                ))
            if cfg.early_stopping_patience and evals_without_gain >= cfg.early_stopping_patience:
                out.stopped_early = True
                break
        bar.close()
    model.eval()
    return out
