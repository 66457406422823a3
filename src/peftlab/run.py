"""One run, end to end: set up, train, select on validation, test once, write the record.

What a run leaves in `output_dir` (the study runner and the report read only these):
  config.yaml              the fully resolved config
  metrics.jsonl            one row per logging or evaluation step (step 0 included)
  summary.json             status, parameter counts, best step, validation and test metrics...
  predictions/test.jsonl   one row per test example (id, reference, prediction, score)
  adapter.safetensors      what was trained, at the selected step (inference form)
Every file is written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from peftlab import __version__
from peftlab.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, save_pack_checkpoints
from peftlab.checks import check_attention_memory, check_label_tokens
from peftlab.config import RunConfig, config_changes, load_run_config, read_yaml_mapping
from peftlab.data import Features, tokenize
from peftlab.device import (
    EVALUATE_TOGETHER,
    resolve_device,
    use_bf16,
    use_bf16_eval,
)
from peftlab.errors import CheckpointError, PeftlabError
from peftlab.evaluate import EvalResult, EvalSettings, evaluate_model, evaluate_predictions
from peftlab.files import save_tensors, write_json, write_jsonl, write_yaml
from peftlab.locks import describe_holder, run_lock
from peftlab.loop import Member, TrainOutcome, train_pack
from peftlab.memory import PeakMemory
from peftlab.methods import Baseline, Method, MethodContext, get_method
from peftlab.models import (
    count_parameters,
    default_tokenizer_for,
    load_model,
    load_tokenizer,
    set_dropout,
)
from peftlab.pack import Pack, initial_state
from peftlab.packing import PACK_FREE_KEYS, pack_key, unpackable_because
from peftlab.records import (
    ADAPTER,
    CELL_FILE,
    CHECKPOINTS,
    CONFIG,
    METRICS,
    PREDICTIONS,
    SUMMARY,
    read_json,
    read_jsonl_checked,
    remove_checkpoints,
    remove_run_files,
    temporaries,
)
from peftlab.tasks import Splits, Task, build_task, prepare_splits
from peftlab.trackers import open_trackers

log = logging.getLogger("peftlab")


def selection_of(cfg: RunConfig, task: Task) -> tuple[str, bool]:
    metric = cfg.selection_metric or task.primary_metric
    return metric, (metric != "loss" and task.higher_is_better)


def environment() -> dict[str, Any]:
    import peft
    import transformers

    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        )
        commit = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": {"peftlab": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "git_commit": commit,
    }


@dataclass
class Setup:
    """Everything a run needs, built from a resolved config (also used by `peftlab eval`)."""

    cfg: RunConfig
    task: Task
    splits: Splits | None  # None: set up without data (a model alone)
    method: Method | Baseline
    tokenizer: PreTrainedTokenizerBase | None = None
    model: torch.nn.Module | None = None
    base_params: int = 0
    device: torch.device = torch.device("cpu")
    bf16: bool = False  # training
    member: int = 0  # its index in the model's pack
    _features: dict[str, Features] = field(default_factory=dict)
    # the members of a pack share validation and test examples: tokenised once for all
    _eval_features: dict[str, Features] = field(default_factory=dict)

    def features(self, split: str) -> Features:
        """The split tokenised (once)."""
        cache = self._features if split == "train" else self._eval_features
        if split not in cache:
            cache[split] = tokenize(self.tokenizer, getattr(self.splits, split),
                                    self.cfg.max_source_length, self.cfg.max_target_length)
        return cache[split]

    def alone(self) -> contextlib.AbstractContextManager:
        """The model computing for this run alone (its member of a pack of several)."""
        pack = getattr(self.model, "peftlab_pack", None)
        if pack is None or pack.members == 1:
            return contextlib.nullcontext()
        return pack.router.evaluating(self.member)

    def eval_settings(self, split: str, progress: bool) -> EvalSettings:
        return EvalSettings(self.cfg.eval_batch_size, self.cfg.max_new_tokens, self.cfg.num_beams,
                            self.device, use_bf16_eval(self.cfg, split),
                            pad_id=self.tokenizer.pad_token_id,
                            generate=split == "test" or self.cfg.generate_on_validation,
                            progress=progress, label_scoring=self.cfg.label_scoring)

    def evaluate(self, split: str, features: Features | None = None,
                 progress: bool = True) -> EvalResult:
        examples = getattr(self.splits, split)
        if isinstance(self.method, Baseline):
            return evaluate_predictions(self.task, self.method.predict(self.splits.train, examples),
                                        examples)
        with self.alone():
            return evaluate_model(self.model, self.tokenizer, self.task, examples,
                                  features or self.features(split),
                                  self.eval_settings(split, progress))


def setup(cfg: RunConfig, for_inference: bool = False, pack: bool = True, data: bool = True
          ) -> Setup:
    """Data, tokenizer, model and method, seeded: the same config gives the same setup.

    A method that trains is set up as a pack of one (peftlab.pack): the one way a run trains,
    alone or beside other runs. `pack=False` leaves the method's own modules (the benchmark's
    reference pipeline trains those). `data=False`: no split is read (splits None), for a
    model alone."""
    return setup_pack([cfg], for_inference, pack, data)[0]


def setup_pack(cfgs: list[RunConfig], for_inference: bool = False, pack: bool = True,
               data: bool = True) -> list[Setup]:
    """One setup per run, all on ONE model: the runs' method tensors are the members of its
    pack, each initialised as its run alone would be (seeded by its own seed)."""
    first = cfgs[0]
    if len({pack_key(c) for c in cfgs}) > 1:
        raise PeftlabError("the runs of a pack may differ only in "
                           f"{', '.join(PACK_FREE_KEYS)}")
    task = build_task(first.task, first.task_args)
    method = get_method(first.method)
    if isinstance(method, Baseline) and method.task_kind != task.kind:
        raise PeftlabError(f"baseline `{method.name}` is for {method.task_kind} tasks; "
                           f"task `{task.name}` is {task.kind}")
    if len(cfgs) > 1 and (reason := unpackable_because(first)) is not None:
        raise PeftlabError(f"these runs cannot be packed: {reason}")
    setups = [Setup(cfg, task, prepare_splits(task, cfg.train_size, cfg.val_size, cfg.test_size,
                                              cfg.seed) if data else None, method, member=m)
              for m, cfg in enumerate(cfgs)]
    if isinstance(method, Baseline):
        return setups
    model = load_model(first.model)
    if first.dropout is not None:
        set_dropout(model, first.dropout)
    tokenizer_path = first.tokenizer or default_tokenizer_for(first.model)
    tokenizer = load_tokenizer(tokenizer_path)
    base_params = count_parameters(model)
    check_label_tokens(task, tokenizer)
    ctx = MethodContext(tokenizer_path, first.max_steps)
    args = method.Args.model_validate(first.method_args)
    try:
        # each member's tensors as its run alone starts them (before the base model changes)
        states = [initial_state(method, args, ctx, model, cfg.seed) for cfg in cfgs] \
            if len(cfgs) > 1 else None
        torch.manual_seed(first.seed)  # method initialisation (LoRA A, prompt draw) follows the seed
        model = method.apply(model, args, ctx, for_inference)
    except ValueError as e:
        raise PeftlabError(f"method `{method.name}`: {e}") from None
    device = resolve_device(first)
    model.to(device)
    if pack and method.trains:
        if states is None:
            states = [{n: p.detach() for n, p in model.named_parameters() if p.requires_grad}]
        Pack(model, [{n: t.to(device) for n, t in st.items()} for st in states], method.route)
    eval_features: dict[str, Features] = {}
    for s in setups:
        if data and any([e.id for e in getattr(s.splits, split)]
                        != [e.id for e in getattr(setups[0].splits, split)]
                        for split in ("validation", "test")):
            raise PeftlabError("the runs of a pack must share their validation and test examples")
        s.tokenizer, s.model, s.base_params, s.device = tokenizer, model, base_params, device
        s.bf16 = use_bf16(s.cfg, device)
        s._eval_features = eval_features
    return setups


def parameter_counts(s: Setup) -> dict[str, Any]:
    """trainable_params: what the method exports and a user keeps (inference form);
    trained_params: what the optimizer updates (training form: prefix tuning's MLP, for
    example, trains far more than the prefixes it folds into); total: base + what it adds."""
    if isinstance(s.method, Baseline):
        return {"trainable_params": 0, "trained_params": 0, "total_params": 0,
                "trainable_percent": 0.0}
    trainable = sum(t.numel() for t in s.method.export_state(s.model).values())
    pack = getattr(s.model, "peftlab_pack", None)
    trained = (sum(p.numel() for _, p in pack.parameters(0)) if pack is not None
               else sum(p.numel() for p in s.model.parameters() if p.requires_grad))
    total = s.base_params + (trainable if s.method.adds_parameters else 0)
    return {"trainable_params": trainable, "trained_params": trained, "total_params": total,
            "trainable_percent": 100.0 * trainable / total}


def prepare_output(cfg: RunConfig, overwrite: bool) -> tuple[Checkpoint | None, list[dict],
                                                            list[str]]:
    """Decide between a fresh start and a resume; refuse to mix two different runs.
    Returns the checkpoint to resume from, the metrics rows it covers, and notes (a
    checkpoint that could not be used, and was discarded)."""
    out = Path(cfg.output_dir)
    for tmp in temporaries(out):  # left by a process killed mid-write
        tmp.unlink(missing_ok=True)
    if overwrite:
        remove_run_files(out)
    if (out / SUMMARY).exists():
        raise PeftlabError(f"{out} already holds a finished run (summary.json); choose another "
                           "output_dir or pass --overwrite")
    if not (out / CONFIG).is_file():
        return None, [], []
    changed = config_changes(read_yaml_mapping(out / CONFIG), cfg.model_dump())
    if changed:
        raise PeftlabError(f"{out} holds an unfinished run with a different config ("
                           f"{'; '.join(changed[:6])}); resume it unchanged or pass --overwrite")
    try:
        ckpt = load_checkpoint(out)
        rows = read_jsonl_checked(out / METRICS) if (out / METRICS).is_file() else []
    except PeftlabError as e:
        remove_checkpoints(out)
        return None, [], [f"{e}; discarded: the run started again from step 0"]
    done = ckpt.step if ckpt else -1
    return ckpt, [r for r in rows if r.get("step", math.inf) <= done], []


def run(cfg: RunConfig, progress: bool = True, overwrite: bool = False,
        locked: bool = False) -> dict[str, Any]:
    """Train one run into `cfg.output_dir` (resuming an unfinished one) and return its summary.

    The run folder's lock is held throughout (`locked`: the caller holds it already), so a
    `peftlab train` and a study runner never write one run at the same time.
    """
    return run_pack([cfg], progress, overwrite, locked)[0]


def run_pack(cfgs: list[RunConfig], progress: bool = True, overwrite: bool = False,
             locked: bool = False, pack_id: str | None = None) -> list[dict[str, Any]]:
    """Train runs that differ only in seed, learning rate and training size as one pack
    (peftlab.pack), each into its own folder exactly as it would alone, and return their
    summaries. Every member's lock is held throughout (`locked`: the caller holds them)."""
    started = time.perf_counter()
    memory = PeakMemory(resolve_device(cfgs[0])).start()
    torch.set_num_threads(cfgs[0].cpu_threads or os.cpu_count() or 1)  # see RunConfig.cpu_threads
    setups = setup_pack(cfgs)  # bad data or a bad model fails here, before anything is written
    check_attention_memory(setups)
    with contextlib.ExitStack() as held:
        if not locked:
            for cfg in cfgs:
                holder = held.enter_context(run_lock(Path(cfg.output_dir)))
                if holder is not None:
                    raise RunLockedError(f"{cfg.output_dir} is being written by "
                                         f"{describe_holder(holder)}; wait for it, or choose "
                                         "another output_dir")
        return _run_held(cfgs, setups, started, memory, progress, overwrite, pack_id)


class RunLockedError(PeftlabError):
    """Another process holds the run folder's lock."""


@dataclass
class _Record:
    """What one run (a member) writes to its folder as it goes."""

    cfg: RunConfig
    s: Setup
    resume: Checkpoint | None
    rows: list[dict[str, Any]]
    notes: list[str]
    trackers: list[Any] = field(default_factory=list)  # log_to (peftlab.trackers)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def log_row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        write_jsonl(self.out / METRICS, self.rows)
        for tracker in self.trackers:
            tracker.row(row)

    def save(self, ckpt: Checkpoint) -> None:
        save_checkpoint(self.out, ckpt)

    def close_trackers(self, summary: dict[str, Any]) -> None:
        """Each tracker gets the summary and is closed, once."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish(summary)


def _trackers(cfg: RunConfig, resume: Checkpoint | None, kept_rows: list[dict[str, Any]]
              ) -> list[Any]:
    """The run's `log_to` trackers, given its study cell's labels where it has them (and the
    study, its folder's name)."""
    if not cfg.log_to:
        return []

    cell = Path(cfg.output_dir) / CELL_FILE
    labels = {"study": Path(cfg.output_dir).parent.name, **read_json(cell)} \
        if cell.is_file() else None
    return open_trackers(cfg.log_to, Path(cfg.output_dir), cfg.model_dump(), labels,
                         resume.step if resume else None, kept_rows)


Prepared = tuple[Checkpoint | None, list[dict[str, Any]], list[str]]


def align_pack_resume(cfgs: list[RunConfig], prepared: list[Prepared]) -> list[Prepared]:
    """A pack resumes as one unit: every member from the oldest step any member checkpointed
    (peftlab.checkpoint.save_pack_checkpoints keeps that step's folders), or every member from
    step 0 when one has no checkpoint. Members in step go through the same chunks as in the
    uninterrupted pack, so resuming changes no number."""
    steps = [ckpt.step if ckpt else None for ckpt, _, _ in prepared]
    if len(prepared) < 2 or len(set(steps)) == 1:
        return prepared
    outs = [Path(cfg.output_dir) for cfg in cfgs]
    common = None if None in steps else min(s for s in steps if s is not None)
    aligned: list[Prepared] = []
    for out, (ckpt, rows, notes) in zip(outs, prepared):
        if ckpt is None or ckpt.step == common:
            aligned.append((ckpt, rows, notes))
            continue
        try:
            earlier = load_checkpoint(out, step=common) if common is not None else None
        except PeftlabError as e:  # the pack cannot resume as one: all from step 0
            for folder in outs:
                remove_checkpoints(folder)
            return [(None, [], [*n, f"{e}; the pack started again from step 0"])
                    for _, _, n in prepared]
        if earlier is None:
            remove_checkpoints(out)
        # not a note in its record: the member's files end as they would have uninterrupted
        log.info("%s: resumes from step %d with the rest of its pack (its own checkpoint was "
                 "at step %d)", out, common or 0, ckpt.step)
        aligned.append((earlier, [r for r in rows if r.get("step", math.inf) <= (
            common if common is not None else -1)], notes))
    return aligned


def _run_held(cfgs: list[RunConfig], setups: list[Setup], started: float, memory: PeakMemory,
              progress: bool, overwrite: bool, pack_id: str | None) -> list[dict[str, Any]]:
    prepared = align_pack_resume(cfgs, [prepare_output(cfg, overwrite) for cfg in cfgs])
    records = []
    for cfg, s, (resume, rows, notes) in zip(cfgs, setups, prepared):
        write_yaml(Path(cfg.output_dir) / CONFIG, cfg.model_dump())
        records.append(_Record(cfg, s, resume, rows, notes, _trackers(cfg, resume, rows)))
    try:
        return _run_records(records, cfgs, setups, started, memory, progress, pack_id)
    finally:
        for r in records:  # a run that did not finish: its trackers' records end as failed
            try:
                r.close_trackers({"status": "failed"})
            except Exception as e:  # noqa: BLE001 - the run's own error is the one to raise
                log.warning("%s: closing its trackers failed: %s", r.out, e)


def _run_records(records: list[_Record], cfgs: list[RunConfig], setups: list[Setup],
                 started: float, memory: PeakMemory, progress: bool, pack_id: str | None
                 ) -> list[dict[str, Any]]:
    setup_s = time.perf_counter() - started
    s0 = setups[0]
    counts = parameter_counts(s0)  # before training: prefix tuning's MLP folds away after it
    trains = not isinstance(s0.method, Baseline) and s0.method.trains
    outcomes: list[TrainOutcome | None] = [None] * len(records)
    if not trains:
        for index, r in enumerate(records):
            began = time.perf_counter()
            val = r.s.evaluate("validation", progress=progress)
            r.log_row({"step": 0, "train_loss": None,
                       **{f"val_{k}": v for k, v in val.metrics.items()}, "lr": None,
                       "elapsed_s": time.perf_counter() - started, "examples_per_s": None,
                       "eval_s": time.perf_counter() - began})
            outcomes[index] = TrainOutcome("completed", 0, val.metrics, {})
    else:
        while True:
            members = [Member(r.cfg, r.s.features("train"), r.log_row, r.resume, r.save)
                       for r in records]
            setups_now = [r.s for r in records]

            def validate(indices: list[int], setups_now: list[Setup] = setups_now
                         ) -> list[dict[str, float]]:
                return [e.metrics for e in evaluate_pack(setups_now, "validation", indices,
                                                         progress)]

            try:
                def commit(saves: list[tuple[int, Checkpoint]]) -> None:
                    save_pack_checkpoints([(records[i].out, ckpt) for i, ckpt in saves],
                                          [r.out for r in records])

                outcomes = train_pack(s0.model, s0.method, members, validate,
                                      selection_of(s0.cfg, s0.task), s0.device, s0.bf16,
                                      s0.tokenizer.pad_token_id, progress, commit)
                break
            except CheckpointError as e:
                # a readable checkpoint that does not fit this run (a missing tensor, a wrong
                # shape, a bad RNG state): that run starts again from step 0, the pack on a
                # freshly built model
                r = records[getattr(e, "member", 0)]
                r.notes.append(f"{r.out / CHECKPOINTS}: {e}; discarded: the run started "
                               "again from step 0")
                remove_checkpoints(r.out)
                r.rows.clear()
                r.resume = None
                for r, s in zip(records, setup_pack(cfgs)):
                    r.s = s
                s0 = records[0].s
        for r, outcome in zip(records, outcomes):
            # the selected checkpoint is the one tested
            r.s.method.load_state(r.s.model, outcome.best_state, r.s.member)
    for r, outcome in zip(records, outcomes):
        if outcome.best_state:
            save_tensors(r.out / ADAPTER, outcome.best_state)
    # The test set is touched once, on the checkpoints chosen by validation.
    began = time.perf_counter()
    tests = evaluate_pack([r.s for r in records], "test", list(range(len(records))), progress)
    test_s = time.perf_counter() - began  # the pass of every member (_finish takes shares)
    summaries = []
    for index, (r, outcome, test) in enumerate(zip(records, outcomes, tests)):
        summaries.append(_finish(r, outcome, test, test_s, counts, trains, setup_s, started,
                                 memory, {"id": pack_id or Path(records[0].cfg.output_dir).name,
                                          "size": len(records), "index": index}
                                 if len(records) > 1 else None))
    return summaries


def evaluate_pack(setups: list[Setup], split: str, indices: list[int], progress: bool
                  ) -> list[EvalResult]:
    """Members `indices` of a pack evaluated on one split: together where the device gains
    by it (`EVALUATE_TOGETHER`: each batch of inputs through the model once per member, in one
    batch routed row by row), else one after another."""
    s = setups[indices[0]]
    pack = getattr(s.model, "peftlab_pack", None)
    if pack is None or pack.members == 1 or not EVALUATE_TOGETHER.get(s.device.type, True):
        return [setups[i].evaluate(split, progress=progress) for i in indices]
    settings = dataclasses.replace(s.eval_settings(split, progress), members=tuple(indices))
    return evaluate_model(s.model, s.tokenizer, s.task, getattr(s.splits, split),
                          s.features(split), settings)


def _finish(r: _Record, outcome: TrainOutcome, test: EvalResult, test_s: float,
            counts: dict[str, Any], trains: bool, setup_s: float, started: float,
            memory: PeakMemory, pack: dict[str, Any] | None) -> dict[str, Any]:
    """Write the run's record: its test predictions, then its summary."""
    cfg, s, out = r.cfg, r.s, r.out
    for note in r.notes:
        log.warning(note)
    summary: dict[str, Any] = {
        "status": "completed", "method": cfg.method, "task": cfg.task, "model": cfg.model,
        "train_size": cfg.train_size, "seed": cfg.seed, "learning_rate": cfg.learning_rate,
        **counts, "data": s.splits.notes,
    }
    if trains:
        summary.update({"status": outcome.status, "steps_done": outcome.steps_done,
                        "stopped_early": outcome.stopped_early})
    summary.update({"best_step": outcome.best_step,
                    "selection_metric": selection_of(cfg, s.task)[0],
                    "val_metrics": outcome.best_val})
    write_jsonl(out / PREDICTIONS, test.rows)
    wall = time.perf_counter() - started + (r.resume.meta["elapsed_s"] if r.resume else 0)
    # a member of a pack of P records 1/P of the pack's times: its share of the machine, what
    # the run cost (the pack's own wall time is under `pack`)
    share = 1 / pack["size"] if pack is not None else 1.0
    phases = phase_seconds(r.rows, setup_s, test_s, trained=trains)
    summary.update({
        "test_metrics": test.metrics,
        "time_s": {phase: seconds * share for phase, seconds in phases.items()},
        "wall_time_s": wall * share,
        "peak_memory_mb": memory.peak_mb(), "peak_memory_kind": memory.kind,
        "device": str(s.device), "bf16": s.bf16, "cpu_threads": torch.get_num_threads(),
        "eval_bf16": {split: use_bf16_eval(cfg, split) for split in ("validation", "test")},
        "notes": r.notes,
        **environment(),
    })
    if pack is not None:
        summary["pack"] = {**pack, "wall_time_s": wall}
    write_json(out / SUMMARY, summary)  # last: its presence marks a finished run
    r.close_trackers(summary)
    remove_checkpoints(out)
    return summary


def phase_seconds(rows: list[dict[str, Any]], setup_s: float, test_s: float, trained: bool
                  ) -> dict[str, float]:
    """Where a run's wall time went: setup (this process: data, tokenizer, model), training
    (steps, checkpoints and logging), validation, test. Training and validation come from the
    metrics rows, so a resumed run counts the steps and evaluations done before it resumed."""
    validation = sum(r.get("eval_s") or 0.0 for r in rows)
    # training rows' elapsed_s is counted from the start of the step-0 evaluation
    training = max(r["elapsed_s"] for r in rows) - validation if trained and rows else 0.0
    return {"setup": setup_s, "training": max(training, 0.0), "validation": validation,
            "test": test_s}


def load_run_dir(run_dir: str | Path) -> tuple[RunConfig, Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PeftlabError(f"{run_dir}: not a run folder (no config.yaml)")
    return load_run_config(run_dir / "config.yaml"), run_dir


def restore(run_dir: str | Path, data: bool = True) -> Setup:
    """Rebuild a saved run: base model + method + the state it saved (`data`: and its splits)."""
    from safetensors.torch import load_file

    cfg, run_dir = load_run_dir(run_dir)
    s = setup(cfg, for_inference=True, data=data)
    if not isinstance(s.method, Baseline) and s.method.trains:
        path = run_dir / ADAPTER
        if not path.is_file():
            raise PeftlabError(f"{path}: missing; the run did not finish saving its state")
        try:
            state = load_file(str(path))
        except Exception as e:
            raise PeftlabError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None
        s.method.load_state(s.model, state)
    return s


def reevaluate(run_dir: str | Path, split: str = "test", progress: bool = True) -> EvalResult:
    """Rebuild a saved run and evaluate one split; the result goes to `run_dir/eval/`."""
    result = restore(run_dir).evaluate(split, progress=progress)
    write_json(Path(run_dir) / "eval" / f"{split}.json", result.metrics)
    write_jsonl(Path(run_dir) / "eval" / f"{split}.jsonl", result.rows)
    return result
