"""The training loop (`train_pack`; a run alone is a pack of one), read top to bottom.

Evaluate at step 0 (the untrained reference) and every `eval_every` steps; keep the state
with the best validation metric; checkpoint after each evaluation so that a killed run
resumes exactly; stop on a non-finite loss (status `diverged`) or when validation stops
improving (`early_stopping_patience`).
"""

from __future__ import annotations

import logging
import math
import os
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
from peftlab.dropout import MemberMasks, member_dropout
from peftlab.errors import CheckpointError
from peftlab.methods import Method
from peftlab.pack import step_gradients

log = logging.getLogger("peftlab")


@dataclass
class TrainOutcome:
    status: str  # "completed" or "diverged"
    best_step: int
    best_val: dict[str, float]
    best_state: dict[str, torch.Tensor]
    stopped_early: bool = False
    steps_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        # Fixed learning rate (no relative step), as in the prompt-tuning paper.
        return Adafactor(params, lr=cfg.learning_rate, relative_step=False,
                         scale_parameter=False, warmup_init=False, weight_decay=cfg.weight_decay)
    # fused: one vectorised kernel over all parameters instead of a dozen tensor ops each.
    # On CPU it took full fine-tuning's optimizer step from 0.40 s to 0.07 s (docs/speed.md).
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
                       optimizer: torch.optim.Optimizer | None, scheduler: Any,
                       dropout: torch.Generator | None = None) -> None:
    """Load a checkpoint into the run, after checking that it fits: every trainable tensor
    present with its shape, optimizer state of the parameters' shapes, usable RNG states
    (`dropout`: the run's dropout generator, peftlab.dropout). What does not fit raises
    CheckpointError (the run then starts again from step 0)."""
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
    if dropout is not None and "dropout" not in ckpt.rng:
        raise unfit("no dropout generator state (written by an older peftlab)")
    rng_before = rng_state()
    try:
        if dropout is not None:
            dropout.set_state(ckpt.rng["dropout"])
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


@dataclass
class Member:
    """One run of a pack as the loop sees it: its config (seed, learning rate), its training
    examples, and where its metrics rows and checkpoints go."""

    cfg: RunConfig
    features: Features
    log_row: Callable[[dict[str, Any]], None]
    resume: Checkpoint | None = None
    save: Callable[[Checkpoint], None] | None = None


# validation of some members of a pack at once: their indices -> each one's metrics
EvaluateMembers = Callable[[list[int]], list[dict[str, float]]]


def train(model: nn.Module, method: Method, cfg: RunConfig, features: Features,
          evaluate_val: Callable[[], dict[str, float]], log_row: Callable[[dict[str, Any]], None],
          selection: tuple[str, bool], device: torch.device, bf16: bool, pad_id: int,
          progress: bool = True, resume: Checkpoint | None = None,
          save: Callable[[Checkpoint], None] | None = None) -> TrainOutcome:
    """One run: a pack of one."""
    member = Member(cfg, features, log_row, resume, save)
    return train_pack(model, method, [member], lambda indices: [evaluate_val()], selection,
                      device, bf16, pad_id, progress)[0]


class _MemberRun:
    """A member's state through the loop: optimizer, schedule, batches, best state, clock."""

    def __init__(self, index: int, member: Member, named: list[tuple[str, nn.Parameter]]):
        self.index, self.member, self.cfg, self.named = index, member, member.cfg, named
        self.params = [p for _, p in named]
        self.optimizer = make_optimizer(self.cfg, self.params) if self.params else None
        warmup = math.ceil(self.cfg.warmup_ratio * self.cfg.max_steps)
        self.scheduler = (linear_schedule(self.optimizer, warmup, self.cfg.max_steps)
                          if self.optimizer else None)
        self.step, self.first_step, self.evals_without_gain, self.active = 0, 1, 0, False
        self.window_loss, self.window_examples = 0.0, 0
        self.start = self.window_start = time.perf_counter()
        self.out: TrainOutcome | None = None
        self.batches: Any = None
        self.row: dict[str, Any] = {}  # the metrics row of the step being finished

    def due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.cfg.max_steps


@flushed_denormals()
def train_pack(
    model: nn.Module,
    method: Method,
    members: list[Member],
    evaluate_members: EvaluateMembers,
    selection: tuple[str, bool],
    device: torch.device,
    bf16: bool,
    pad_id: int,
    progress: bool = True,
    commit: Callable[[list[tuple[int, Checkpoint]]], None] | None = None,
) -> list[TrainOutcome]:
    """Train every member of the model's pack (peftlab.pack) together: one forward and
    backward over all their micro-batches per step, one validation pass for all members due
    an evaluation; everything else (optimizer, schedule, clipping, best state, checkpoints,
    early stopping, divergence) each member's own, as if it ran alone. A member that stops
    (diverged, stopped early, done) leaves the others going. A member resumed from a later
    checkpoint than another simply is some steps ahead: each counts its own steps."""
    metric, higher_is_better = selection
    if commit is None:  # each member saves its own (a pack resumes as one with the caller's)

        def commit(saves: list[tuple[int, Checkpoint]]) -> None:
            for index, checkpoint in saves:
                members[index].save(checkpoint)
    pack = getattr(model, "peftlab_pack", None)
    if pack is not None and pack.members != len(members):
        raise ValueError(f"a pack of {pack.members} trained with {len(members)} members")
    runs = [_MemberRun(i, m, pack.parameters(i) if pack is not None else [])
            for i, m in enumerate(members)]
    masks = MemberMasks([m.cfg.seed for m in members], device)  # each member's dropout

    def snapshot(run: _MemberRun) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True)
                for k, v in method.export_state(model, run.index).items()}

    def validate(due: list[_MemberRun]) -> list[tuple[dict[str, float], float]]:
        """One validation pass for the members due, and its seconds (each row records them:
        what validation costs is then on record; a pack's members share them)."""
        began = time.perf_counter()
        vals = evaluate_members([run.index for run in due])
        seconds = time.perf_counter() - began
        return [(val, seconds) for val in vals]

    # --- resumed members first: a checkpoint that does not fit raises before anything is logged
    for run in runs:
        resume = run.member.resume
        if resume is None:
            continue
        # continue exactly where the checkpoint left off: weights, optimizer, schedule, RNG
        try:
            restore_checkpoint(resume, run.named, run.optimizer, run.scheduler,
                               masks.generators[run.index])
        except CheckpointError as e:
            e.member = run.index  # the caller discards that member's checkpoint
            raise
        run.start = time.perf_counter() - resume.meta["elapsed_s"]
        run.out = TrainOutcome("completed", resume.meta["best_step"], resume.meta["best_val"],
                               resume.best_state, steps_done=resume.step)
        run.step, run.evals_without_gain = resume.step, resume.meta["evals_without_gain"]
    # --- step 0: the untrained model is the first point of every curve
    fresh = [run for run in runs if run.member.resume is None]
    if fresh:
        start = time.perf_counter()
        for run, (val, eval_s) in zip(fresh, validate(fresh)):
            run.start = start
            run.out = TrainOutcome("completed", 0, val, snapshot(run))
            run.member.log_row({"step": 0, "train_loss": None,
                                **{f"val_{k}": v for k, v in val.items()},
                                "lr": run.scheduler.get_last_lr()[0] if run.scheduler else None,
                                "elapsed_s": time.perf_counter() - start,
                                "examples_per_s": None, "eval_s": eval_s})
    for run in runs:
        cfg = run.cfg
        if run.member.resume is not None and cfg.early_stopping_patience and \
                run.evals_without_gain >= cfg.early_stopping_patience:
            run.out.stopped_early = True  # it had stopped at this checkpoint: it stays stopped
            continue
        run.first_step = run.step + 1
        run.active = run.optimizer is not None and run.step < cfg.max_steps
    if not any(run.active for run in runs):
        return [run.out for run in runs]

    model.train()
    with member_dropout(model, masks):  # see peftlab.dropout
        for run in runs:
            run.batches = training_batches(run.member.features, run.cfg.batch_size, run.cfg.seed,
                                           pad_id, skip=run.step * run.cfg.grad_accum_steps,
                                           group_by_length=run.cfg.group_by_length)
            run.window_start = time.perf_counter()
        bar = tqdm(total=sum(r.cfg.max_steps for r in runs), initial=sum(r.step for r in runs),
                   desc="train", leave=False, disable=not progress or None)
        lines = ProgressLines(runs, progress and bar.disable)  # a log, not a TTY: lines
        while any(run.active for run in runs):
            # --- one optimizer step of every active member, over grad_accum_steps micro-batches
            micro_batches = [[next(run.batches) for _ in range(run.cfg.grad_accum_steps)]
                             if run.active else [] for run in runs]
            losses = step_gradients(pack, micro_batches, device, bf16, pad_id, masks)
            stepped = [run for run, batches, loss in zip(runs, micro_batches, losses)
                       if run.active and _optimizer_step(run, batches, loss, method, model)]
            bar.update(sum(1 for loss in losses if loss is not None))
            # --- evaluate the members due (together or in turn: run.evaluate_pack); log,
            # keep the best, checkpoint
            due = [run for run in stepped if run.due(run.step)]
            evaluations = dict(zip((run.index for run in due), validate(due))) if due else {}
            due_saves = [(run.index, ckpt) for run in stepped if (ckpt := _finish_step(
                run, evaluations.get(run.index), metric, higher_is_better, snapshot,
                masks.generators[run.index])) is not None]
            if due_saves:  # every member's checkpoint of this step, as one unit
                commit(due_saves)
            lines.maybe(losses)
        bar.close()
    model.eval()
    return [run.out for run in runs]


class ProgressLines:
    """Progress as log lines every `PEFTLAB_PROGRESS_SECONDS` (default 30) when the progress
    bar is off because the output is not a terminal (a job log, `nohup`, a notebook's
    captured stream): a 16-minute run used to print nothing until it ended."""

    def __init__(self, runs: list[_MemberRun], enabled: bool):
        self.runs, self.enabled = runs, enabled
        self.every = float(os.environ.get("PEFTLAB_PROGRESS_SECONDS", "30"))
        self.began = self.last = time.perf_counter()
        self.steps_at_start = sum(r.step for r in runs)

    def maybe(self, losses: list[float | None]) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.every:
            return
        self.last = now
        done = sum(r.step for r in self.runs)
        total = sum(r.cfg.max_steps for r in self.runs)
        rate = (done - self.steps_at_start) / max(now - self.began, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("nan")
        finite = [x for x in losses if x is not None and math.isfinite(x)]
        loss = f"loss {sum(finite) / len(finite):.4g}" if finite else "loss -"
        who = f" ({len(self.runs)} runs)" if len(self.runs) > 1 else ""
        log.info("train%s: step %d/%d, %s, %.2f steps/s, ETA %s", who, done, total, loss, rate,
                 _duration(eta))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _optimizer_step(run: _MemberRun, micro_batches: list[dict[str, torch.Tensor]],
                    step_loss: float, method: Method, model: nn.Module) -> bool:
    """A member's step after the shared backward: its clipping and optimizer step, and the
    start of its metrics row. False: the loss was not finite, the member diverged."""
    cfg, out = run.cfg, run.out
    run.step = step = run.step + 1
    run.window_examples += sum(len(b["input_ids"]) for b in micro_batches)
    if not math.isfinite(step_loss):
        out.status, out.steps_done, run.active = "diverged", step, False
        run.member.log_row({"step": step, "train_loss": step_loss,
                            "lr": run.scheduler.get_last_lr()[0],
                            "elapsed_s": time.perf_counter() - run.start, "examples_per_s": None})
        return False
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm, foreach=True)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    method.on_step(model, step)
    out.steps_done = step
    run.window_loss += step_loss
    run.row = {}
    if step % cfg.log_every == 0 or run.due(step):
        previous = out.history[-1]["step"] if out.history else run.first_step - 1
        now = time.perf_counter()
        run.row = {"step": step, "train_loss": run.window_loss / max(step - previous, 1),
                   "lr": lr, "elapsed_s": now - run.start,
                   "examples_per_s": run.window_examples / max(now - run.window_start, 1e-9)}
        run.window_loss, run.window_examples = 0.0, 0
    return True


def _finish_step(run: _MemberRun, evaluation: tuple[dict[str, float], float] | None,
                 metric: str, higher_is_better: bool, snapshot: Callable,
                 dropout: torch.Generator) -> Checkpoint | None:
    """A member's step after the evaluation (if it was due one): its metrics row, best state
    and stopping rules; the checkpoint it is due, for the pack to save as one unit."""
    cfg, out, row, step = run.cfg, run.out, run.row, run.step
    if evaluation is not None:
        val, row["eval_s"] = evaluation
        row.update({f"val_{k}": v for k, v in val.items()})
        row["elapsed_s"] = time.perf_counter() - run.start
        if is_better(val[metric], out.best_val.get(metric), higher_is_better):
            out.best_step, out.best_val, out.best_state = step, val, snapshot(run)
            run.evals_without_gain = 0
        else:
            run.evals_without_gain += 1
    if row:
        run.member.log_row(row)
        out.history.append(row)
        run.window_start = time.perf_counter()
    checkpoint = None
    if run.member.save is not None and step % cfg.eval_every == 0 and step < cfg.max_steps:
        # --- checkpoint after each evaluation (the final step needs none: the run ends)
        checkpoint = Checkpoint(
            step, {n: p.detach().cpu() for n, p in run.named}, run.optimizer.state_dict(),
            out.best_state, {**rng_state(), "dropout": dropout.get_state()},
            {"scheduler": run.scheduler.state_dict(), "best_step": out.best_step,
             "best_val": out.best_val, "evals_without_gain": run.evals_without_gain,
             "elapsed_s": time.perf_counter() - run.start},
        )
    if cfg.early_stopping_patience and run.evals_without_gain >= cfg.early_stopping_patience:
        out.stopped_early = True
        run.active = False
    elif step >= cfg.max_steps:
        run.active = False
    return checkpoint
