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
from peftlab.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from peftlab.config import RunConfig, config_changes, read_yaml_mapping
from peftlab.data import Features, tokenize
from peftlab.errors import CheckpointError, PeftlabError
from peftlab.evaluate import EvalResult, EvalSettings, evaluate_model, evaluate_predictions
from peftlab.files import save_tensors, write_json, write_jsonl, write_yaml
from peftlab.locks import describe_holder, run_lock
from peftlab.memory import PeakMemory
from peftlab.methods import Baseline, Method, MethodContext, get_method
from peftlab.models import count_parameters, default_tokenizer_for, load_model, load_tokenizer
from peftlab.pack import Pack
from peftlab.records import (
    ADAPTER,
    CHECKPOINTS,
    CONFIG,
    METRICS,
    PREDICTIONS,
    SUMMARY,
    read_jsonl_checked,
    remove_checkpoints,
    remove_run_files,
    temporaries,
)
from peftlab.tasks import ClassificationTask, Splits, Task, build_task, prepare_splits
from peftlab.train import train

log = logging.getLogger("peftlab")


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PeftlabError("`device: cuda` but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def native_bf16(device: torch.device) -> bool:
    """Does this device multiply bf16 matrices in hardware? A CPU without AVX512-BF16 or AMX
    emulates them, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu  # torch's own CPU capability probes: private, hence the fallback
    return any(getattr(cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    """Training. auto: bf16 autocast on a GPU that supports it; fp32 on CPU, where bf16
    training moved full fine-tuning's loss curve and metric (docs/speed.md)."""
    if cfg.precision == "auto":
        return device.type == "cuda" and native_bf16(device)
    return cfg.precision == "bf16"


def use_bf16_eval(cfg: RunConfig, split: str) -> bool:
    """Evaluation. fp32 (the default) everywhere, so what validation selects (checkpoint,
    learning rate, size) is chosen on the numbers the test split reports: bf16 rounding
    flipped 12% of a near-chance model's predictions (docs/speed.md). `bf16-validation`
    evaluates the repeated validation passes on a bf16 copy (about twice as fast where bf16
    is native) and the test split in fp32; `bf16` evaluates both in bf16."""
    if cfg.eval_precision == "bf16-validation":
        return split != "test"
    return cfg.eval_precision == "bf16"


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
    splits: Splits
    method: Method | Baseline
    tokenizer: PreTrainedTokenizerBase | None = None
    model: torch.nn.Module | None = None
    base_params: int = 0
    device: torch.device = torch.device("cpu")
    bf16: bool = False  # training
    _features: dict[str, Features] = field(default_factory=dict)

    def features(self, split: str) -> Features:
        """The split tokenised (once)."""
        if split not in self._features:
            self._features[split] = tokenize(self.tokenizer, getattr(self.splits, split),
                                             self.cfg.max_source_length,
                                             self.cfg.max_target_length)
        return self._features[split]

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
        return evaluate_model(self.model, self.tokenizer, self.task, examples,
                              features or self.features(split), self.eval_settings(split, progress))


def setup(cfg: RunConfig, for_inference: bool = False, pack: bool = True) -> Setup:
    """Data, tokenizer, model and method, seeded: the same config gives the same setup.

    A method that trains is set up as a pack of one (peftlab.pack): the one way a run trains,
    alone or beside other runs. `pack=False` leaves the method's own modules (the benchmark's
    reference pipeline trains those)."""
    task = build_task(cfg.task, cfg.task_args)
    method = get_method(cfg.method)
    if isinstance(method, Baseline) and method.task_kind != task.kind:
        raise PeftlabError(f"baseline `{method.name}` is for {method.task_kind} tasks; "
                           f"task `{task.name}` is {task.kind}")
    splits = prepare_splits(task, cfg.train_size, cfg.val_size, cfg.test_size, cfg.seed)
    s = Setup(cfg, task, splits, method)
    if isinstance(method, Baseline):
        return s
    model = load_model(cfg.model)
    tokenizer_path = cfg.tokenizer or default_tokenizer_for(cfg.model)
    s.tokenizer = load_tokenizer(tokenizer_path)
    s.base_params = count_parameters(model)
    check_label_tokens(task, s.tokenizer)
    torch.manual_seed(cfg.seed)  # method initialisation (LoRA A, prompt draw) follows the seed
    ctx = MethodContext(tokenizer_path, cfg.max_steps)
    args = method.Args.model_validate(cfg.method_args)
    try:
        s.model = method.apply(model, args, ctx, for_inference)
    except ValueError as e:
        raise PeftlabError(f"method `{method.name}`: {e}") from None
    s.device = resolve_device(cfg)
    s.bf16 = use_bf16(cfg, s.device)
    s.model.to(s.device)
    if pack and method.trains:
        state = {n: p.detach() for n, p in s.model.named_parameters() if p.requires_grad}
        Pack(s.model, [state], method.route)
    return s


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate: free GPU memory, or MemAvailable (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_attention_memory(s: Setup) -> None:
    """Refuse, before allocating, a run whose attention scores cannot fit: they grow with the
    square of the longest input, and `max_source_length: 100000` on SAMSum ended in an
    out-of-memory traceback (or, on Linux, the kernel killing the process with no message).
    A lower bound: scores, softmax and dropout mask of every encoder layer of the largest
    batch while training (eval_batch_size, one layer at a time, when evaluating)."""
    if s.model is None:
        return
    config = s.model.config
    heads = getattr(config, "num_heads", None) or getattr(config, "encoder_attention_heads", 1)
    layers = getattr(config, "num_layers", None) or getattr(config, "encoder_layers", 1)
    longest = max(max((len(x) for x in s.features(split).input_ids), default=0)
                  for split in ("train", "validation", "test"))
    per_matrix = heads * longest ** 2 * 4 * 3
    needed = max(s.cfg.batch_size * per_matrix * layers, s.cfg.eval_batch_size * per_matrix)
    free = available_memory(s.device)
    if free is not None and needed > free:
        raise PeftlabError(
            f"the longest input is {longest:,} tokens (`max_source_length` "
            f"{s.cfg.max_source_length:,}): its attention scores alone need about "
            f"{needed / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB is free. Lower "
            "`max_source_length`, `batch_size` or `eval_batch_size`.")


def check_label_tokens(task: Task, tokenizer: PreTrainedTokenizerBase) -> None:
    """Rank classification cannot tell apart label words that tokenize the same."""
    if not isinstance(task, ClassificationTask):
        return
    seen: dict[tuple[int, ...], str] = {}
    for word in task.label_words:
        ids = tuple(tokenizer(word)["input_ids"])
        if ids in seen:
            raise PeftlabError(f"label words {seen[ids]!r} and {word!r} are the same tokens "
                               f"{list(ids)} for this tokenizer; give each class its own word")
        seen[ids] = word


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
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    memory = PeakMemory(resolve_device(cfg)).start()
    torch.set_num_threads(cfg.cpu_threads or os.cpu_count() or 1)  # see RunConfig.cpu_threads
    s = setup(cfg)  # bad data or a bad model fails here, before anything is written
    check_attention_memory(s)
    with contextlib.nullcontext() if locked else run_lock(out) as holder:
        if holder is not None:
            raise RunLockedError(f"{out} is being written by {describe_holder(holder)}; wait "
                                 "for it, or choose another output_dir")
        return _run_held(cfg, s, started, memory, progress, overwrite)


class RunLockedError(PeftlabError):
    """Another process holds the run folder's lock."""


def _run_held(cfg: RunConfig, s: Setup, started: float, memory: PeakMemory, progress: bool,
              overwrite: bool) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    resume, rows, notes = prepare_output(cfg, overwrite)
    write_yaml(out / CONFIG, cfg.model_dump())
    counts = parameter_counts(s)
    setup_s = time.perf_counter() - started

    def log_row(row: dict[str, Any]) -> None:
        rows.append(row)
        write_jsonl(out / METRICS, rows)

    summary: dict[str, Any] = {
        "status": "completed", "method": cfg.method, "task": cfg.task, "model": cfg.model,
        "train_size": cfg.train_size, "seed": cfg.seed, "learning_rate": cfg.learning_rate,
        **counts, "data": s.splits.notes,
    }
    trains = not isinstance(s.method, Baseline) and s.method.trains
    if not trains:
        began = time.perf_counter()
        val = s.evaluate("validation", progress=progress)
        log_row({"step": 0, "train_loss": None, **{f"val_{k}": v for k, v in val.metrics.items()},
                 "lr": None, "elapsed_s": time.perf_counter() - started, "examples_per_s": None,
                 "eval_s": time.perf_counter() - began})
        best_step, best_val, state, extra = 0, val.metrics, {}, {}
    else:
        def train_from(setup_: Setup, checkpoint: Checkpoint | None):
            val_features = setup_.features("validation")
            return train(
                setup_.model, setup_.method, cfg, setup_.features("train"),
                lambda: setup_.evaluate("validation", val_features, progress).metrics,
                log_row, selection_of(cfg, setup_.task), setup_.device, setup_.bf16,
                setup_.tokenizer.pad_token_id, progress,
                resume=checkpoint, save=lambda ckpt: save_checkpoint(out, ckpt),
            )

        try:
            outcome = train_from(s, resume)
        except CheckpointError as e:
            # a readable checkpoint that does not fit this run (a missing tensor, a wrong
            # shape, a bad RNG state): start again from step 0, on a freshly built model
            notes.append(f"{out / CHECKPOINTS}: {e}; discarded: the run started again from "
                         "step 0")
            remove_checkpoints(out)
            rows.clear()
            s = setup(cfg)
            resume = None
            outcome = train_from(s, None)
        best_step, best_val, state = outcome.best_step, outcome.best_val, outcome.best_state
        extra = {"status": outcome.status, "steps_done": outcome.steps_done,
                 "stopped_early": outcome.stopped_early}
        s.method.load_state(s.model, state)  # the selected checkpoint is the one tested
    for note in notes:
        log.warning(note)
    summary.update(extra)
    summary.update({"best_step": best_step, "selection_metric": selection_of(cfg, s.task)[0],
                    "val_metrics": best_val})
    if state:
        save_tensors(out / ADAPTER, state)
    # The test set is touched once, on the checkpoint chosen by validation.
    began = time.perf_counter()
    test = s.evaluate("test", progress=progress)
    test_s = time.perf_counter() - began
    write_jsonl(out / PREDICTIONS, test.rows)
    summary.update({
        "test_metrics": test.metrics,
        "time_s": phase_seconds(rows, setup_s, test_s, trained=trains),
        "wall_time_s": time.perf_counter() - started + (resume.meta["elapsed_s"] if resume else 0),
        "peak_memory_mb": memory.peak_mb(), "peak_memory_kind": memory.kind,
        "device": str(s.device), "bf16": s.bf16, "cpu_threads": torch.get_num_threads(),
        "eval_bf16": {split: use_bf16_eval(cfg, split) for split in ("validation", "test")},
        "notes": notes,
        **environment(),
    })
    write_json(out / SUMMARY, summary)  # last: its presence marks a finished run
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
    from peftlab.config import load_run_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PeftlabError(f"{run_dir}: not a run folder (no config.yaml)")
    return load_run_config(run_dir / "config.yaml"), run_dir


def restore(run_dir: str | Path) -> Setup:
    """Rebuild a saved run: base model + method + the state it saved."""
    from safetensors.torch import load_file

    cfg, run_dir = load_run_dir(run_dir)
    s = setup(cfg, for_inference=True)
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
