"""`peftlab bench`: speed measured side by side with the pipeline users would otherwise write.

Each measurement runs in its own subprocess, so that peak memory is that measurement's own
(process peak RSS on CPU, `max_memory_allocated` on GPU) and no cache from another
measurement helps it. The model is `flan-t5-small-random` (the real geometry: speed does not
depend on weight values); batches come from the real SST-2 and SAMSum data.

Sections:
  matmul     the machine's measured matmul peak (fp32 and bf16)
  train      training throughput per method and batch shape: peftlab's loop vs the reference
             (Seq2SeqTrainer + peft + DataCollatorForSeq2Seq), model FLOPs utilisation (MFU)
  mfu        full fine-tuning's MFU by batch size, fp32 and bf16, SST-2 shapes
  numerics   the same batches in the same order: per-step fp32 loss, peftlab vs reference
  bf16       bf16 autocast vs fp32 training, same seed and batches: speed, loss-curve drift,
             metric
  bf16_eval  one fp32-trained checkpoint evaluated in fp32 and in bf16: agreement, metric, time
  batching   length-grouped vs random batches: padding, speed, and the metric after training
  eval       SST-2 by rank classification vs generation (ours, in the default evaluation
             precision and in fp32, and the reference's `predict_with_generate`); SAMSum
             generation throughput
  cell       one ablation cell end to end (200 steps, evaluation every 50 on 200 validation
             examples, the full test split): peftlab vs the reference pipeline, wall time
  grid       runs per hour with N runs at once through the study runner: sharing one GPU
             (`--runs-per-gpu N`), or on CPU N worker processes splitting the cores
             (`peftlab run STUDY --workers N`; N up to the number of CPUs)
  pack       runs per hour of the same cells unpacked and in packs of P (`peftlab run
             --pack P`), per method and shape, with the MFU of their training steps; on a GPU
             also unpacked with N runs sharing it; and a built-in study's wall time per P
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL = "flan-t5-small-random"
SECTIONS = ("matmul", "train", "mfu", "numerics", "bf16", "bf16_eval", "batching", "eval",
            "cell", "grid", "pack")
MFU_BATCH_SIZES = (8, 32, 64)
SHAPES = {  # task, max source length, max target length
    "sst2": ("sst2", 128, 8),
    "samsum": ("samsum", 512, 128),
}


# --- what one subprocess measures ----------------------------------------------------------

def _setup(method: str, shape: str, batch_size: int, n_examples: int, dropout: bool = True,
           model: str = MODEL, pack: bool = True, **overrides: Any):
    import torch

    from peftlab.config import resolve_run_config
    from peftlab.data import tokenize
    from peftlab.run import setup

    task, src, tgt = SHAPES[shape]
    cfg = resolve_run_config({
        "model": model, "task": task, "method": method, "train_size": n_examples,
        "val_size": 200, "test_size": "all", "batch_size": batch_size, "seed": 0,
        "max_source_length": src, "max_target_length": tgt, "output_dir": tempfile.mkdtemp(),
        **overrides,
    })
    s = setup(cfg, pack=pack)  # the reference trains the method's own (peft) modules
    if not dropout:  # the numerics check: both pipelines must draw the same (no) masks
        for module in s.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "dropout", None), float):  # T5 attention-prob dropout
                module.dropout = 0.0
    features = tokenize(s.tokenizer, s.splits.train, src, tgt)
    torch.manual_seed(0)
    return cfg, s, features


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_flops(cfg_model, enc_lens: list[int], dec_lens: list[int], full: bool) -> float:
    """Training FLOPs of one batch, counted from the real (non-padding) lengths.

    Forward multiply-adds per token: encoder layer 4*D*I (q, k, v, o) + 3*D*F (gated FFN)
    + 2*L_enc*I (scores and values); decoder layer the same with self-attention over the
    decoder prefix, plus cross-attention (q, o on decoder tokens, k, v on encoder tokens,
    2*L_enc*I for scores and values); the LM head D*V per decoder token. A training step is
    3x the forward for full fine-tuning (weight and activation gradients), 2x when the base
    weights are frozen (activation gradients only).
    """
    c = cfg_model
    D, inner, F, V = c.d_model, c.num_heads * c.d_kv, c.d_ff, c.vocab_size
    macs = 0.0
    for le, ld in zip(enc_lens, dec_lens):
        macs += c.num_layers * le * (4 * D * inner + 3 * D * F + 2 * le * inner)
        macs += c.num_decoder_layers * (
            ld * (4 * D * inner + 3 * D * F + ld * inner)  # causal: about half of L_dec
            + ld * (2 * D * inner + 2 * le * inner) + le * 2 * D * inner
        )
        macs += ld * D * V
    return 2 * macs * (3 if full else 2)


def _peak_memory():
    """This measurement's own peak memory (see peftlab.memory), from here on."""
    import torch

    from peftlab.memory import PeakMemory

    return PeakMemory(torch.device("cuda" if torch.cuda.is_available() else "cpu")).start()


def measure_ours(method: str, shape: str, batch_size: int, steps: int, warmup: int,
                 precision: str, model: str = MODEL, group_by_length: bool = True,
                 ) -> dict[str, Any]:
    from peftlab.data import training_batches
    from peftlab.loop import train

    memory = _peak_memory()
    cfg, s, features = _setup(method, shape, batch_size, 256, model=model)
    cfg = cfg.model_copy(update={"max_steps": warmup + steps, "log_every": warmup,
                                 "eval_every": 10**9, "warmup_ratio": 0.0,
                                 "precision": precision, "group_by_length": group_by_length})
    bf16 = precision == "bf16"
    rows: list[dict] = []
    metric = s.task.primary_metric

    def at_eval() -> dict[str, float]:  # the last step's "evaluation": only a clock sync
        _sync(s.device)
        return {metric: 0.0, "loss": 0.0}

    train(s.model, s.method, cfg, features, at_eval, rows.append, (metric, True), s.device,
          bf16, s.tokenizer.pad_token_id, progress=False)
    # MFU's denominator, measured in this process right after the steps: this machine's
    # matmul rate moves by up to 2x between minutes (a shared host), so a peak from another
    # process at another time made MFU swing as much. Not before the steps: 2048-sized fp32
    # then bf16 products run first made the full fine-tuning steps after them 2x slower.
    peak = measure_matmul()[f"{precision}_flops_per_s"]
    timed = next(r for r in rows if r["step"] == warmup + steps)
    seconds = timed["elapsed_s"] - next(r for r in rows if r["step"] == warmup)["elapsed_s"]
    # the same batches again, to count their real and padded tokens
    batches = training_batches(features, cfg.batch_size, cfg.seed, s.tokenizer.pad_token_id,
                               group_by_length=group_by_length)
    enc, dec, examples, padded = [], [], 0, 0
    for i, b in enumerate(batches):
        if i >= warmup + steps:
            break
        if i >= warmup:
            enc += b["attention_mask"].sum(1).tolist()
            dec += (b["labels"] != -100).sum(1).tolist()
            examples += len(b["input_ids"])
            padded += b["input_ids"].numel() + b["labels"].numel()
    flops = model_flops(s.model.config, enc, dec, full=method == "full")
    return {"seconds": seconds, "examples_per_s": examples / seconds,
            "tokens_per_s": (sum(enc) + sum(dec)) / seconds, "flops_per_s": flops / seconds,
            "peak_flops_per_s": peak, "mfu": flops / seconds / peak,
            "padding_fraction": 1 - (sum(enc) + sum(dec)) / padded,
            "peak_memory_mb": memory.peak_mb(), "device": str(s.device)}


def _reference_features(s, examples, src: int, tgt: int) -> list[dict[str, list[int]]]:
    """Tokenised as the Hugging Face summarisation/translation examples do it."""
    enc = s.tokenizer([e.source for e in examples], max_length=src, truncation=True)
    lab = s.tokenizer(text_target=[e.target for e in examples], max_length=tgt, truncation=True)
    return [{"input_ids": i, "labels": t} for i, t in zip(enc["input_ids"], lab["input_ids"])]


def _reference_args(s, cfg, precision: str, **kw: Any):
    from transformers import Seq2SeqTrainingArguments

    base = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate, lr_scheduler_type="linear", max_grad_norm=1.0,
                weight_decay=0.0, optim="adamw_torch", save_strategy="no", report_to="none",
                disable_tqdm=True, use_cpu=s.device.type == "cpu", bf16=precision == "bf16",
                seed=0, dataloader_num_workers=0)
    return Seq2SeqTrainingArguments(**{**base, **kw})


def measure_reference(method: str, shape: str, batch_size: int, steps: int, warmup: int,
                      precision: str, sequential: bool = False,
                      order: list[int] | None = None, n_examples: int = 256,
                      dropout: bool = True, model: str = MODEL) -> dict[str, Any]:
    """What the HF docs show: Seq2SeqTrainer + peft + DataCollatorForSeq2Seq."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, TrainerCallback

    memory = _peak_memory()
    cfg, s, features = _setup(method, shape, batch_size, n_examples, dropout, model=model,
                              pack=False)
    idx = order if order is not None else list(range(len(features)))
    # A plain list is a valid torch Dataset; `datasets` would add nothing to the timing.
    data = [{"input_ids": features.input_ids[i], "labels": features.labels[i]} for i in idx]
    marks: dict[int, float] = {}
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(s.device)
            marks[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = _reference_args(s, cfg, precision, max_steps=warmup + steps, warmup_steps=0,
                           logging_steps=1,
                           train_sampling_strategy="sequential" if sequential else "random")
    collator = DataCollatorForSeq2Seq(s.tokenizer, model=s.model, padding=True,
                                      label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=s.model, args=args, train_dataset=data,
                             data_collator=collator, callbacks=[Clock()])
    trainer.train()
    seconds = marks[warmup + steps] - marks[warmup]
    examples = steps * batch_size
    return {"seconds": seconds, "examples_per_s": examples / seconds, "losses": losses,
            "peak_memory_mb": memory.peak_mb()}


def measure_numerics(method: str, steps: int, model: str = MODEL) -> dict[str, Any]:
    """Same batches, same order, fp32: per-step losses of both pipelines."""
    import numpy as np

    from peftlab.data import length_grouped_batches

    cfg, s, features = _setup(method, "sst2", 8, 64, dropout=False, model=model)
    lengths = [len(a) + len(b) for a, b in zip(features.input_ids, features.labels)]
    order = [i for b in length_grouped_batches(lengths, 8, np.random.default_rng([0, 0]))
             for i in b]  # peftlab's first epoch, flattened: 8 full batches of 8
    ours = subprocess_measure("ours-losses", method=method, steps=steps, model=model)
    ref = subprocess_measure("reference", method=method, shape="sst2", batch_size=8, steps=steps,
                             warmup=0, precision="fp32", sequential=True, order=order,
                             n_examples=64, dropout=False, model=model)
    if "error" in ours or "error" in ref:
        return {"error": ours.get("error") or ref.get("error")}
    diffs = [abs(a - b) for a, b in zip(ours["losses"], ref["losses"])]
    return {"ours": ours["losses"], "reference": ref["losses"], "max_abs_diff": max(diffs)}


def measure_ours_losses(method: str, steps: int, model: str = MODEL) -> dict[str, Any]:
    from peftlab.loop import train

    cfg, s, features = _setup(method, "sst2", 8, 64, dropout=False, model=model)
    cfg = cfg.model_copy(update={"max_steps": steps, "log_every": 1, "eval_every": 10**9,
                                 "warmup_ratio": 0.0, "precision": "fp32"})
    rows: list[dict] = []
    metric = s.task.primary_metric
    train(s.model, s.method, cfg, features, lambda: {metric: 0.0, "loss": 0.0}, rows.append,
          (metric, True), s.device, False, s.tokenizer.pad_token_id, progress=False)
    return {"losses": [r["train_loss"] for r in rows if r["step"] > 0]}


def measure_curve(method: str, shape: str, steps: int, precision: str, model: str = MODEL,
                  group_by_length: bool = True, train_size: int = 1000) -> dict[str, Any]:
    """A real (short) run: its training-loss curve, speed, and validation metric at the end."""
    from peftlab.config import resolve_run_config
    from peftlab.files import read_jsonl
    from peftlab.run import run

    task, src, tgt = SHAPES[shape]
    cfg = resolve_run_config({
        "model": model, "task": task, "method": method, "train_size": train_size,
        "val_size": 200, "test_size": 8, "seed": 0, "max_steps": steps, "eval_every": steps,
        "log_every": 10, "max_source_length": src, "max_target_length": tgt,
        "precision": precision, "group_by_length": group_by_length,
        "output_dir": tempfile.mkdtemp(),
    })
    summary = run(cfg, progress=False)
    rows = read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
    train_rows = [r for r in rows if r["step"] > 0]
    # training time: the clock between the step-0 evaluation and the final one
    train_s = train_rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    metric = summary["selection_metric"]
    return {"steps": [r["step"] for r in train_rows],
            "losses": [r["train_loss"] for r in train_rows],
            "val_metric": rows[-1][f"val_{metric}"], "metric": metric,
            "examples_per_s": steps * cfg.batch_size / train_s, "status": summary["status"]}


def measure_eval(shape: str, n: int, batch_size: int, bf16: bool | None = None,
                 model: str = MODEL) -> dict[str, Any]:
    """Our evaluation alone; `bf16` None: the run default for validation evaluations."""
    from peftlab.data import tokenize
    from peftlab.evaluate import generate, inference_model, rank_classify

    _, s, _ = _setup("untuned", shape, batch_size, 16, model=model)
    examples = s.splits.test[:n]
    task, src, tgt = SHAPES[shape]
    feats = tokenize(s.tokenizer, examples, src, tgt)
    settings = s.eval_settings("validation", progress=False)
    settings.batch_size = batch_size
    if bf16 is not None:
        settings.bf16 = bf16
    evaluated = inference_model(s.model, settings.bf16)
    out: dict[str, Any] = {"examples": len(examples), "max_new_tokens": settings.max_new_tokens,
                           "bf16": settings.bf16}
    if shape == "sst2":
        candidates = [s.tokenizer(w)["input_ids"] for w in s.task.label_words]
        warm = tokenize(s.tokenizer, examples[:batch_size], src, tgt)
        rank_classify(evaluated, warm, candidates, settings)  # warm-up: first-call allocations
        for key, tokenizer in (("rank", None), ("rank_and_generate", s.tokenizer)):
            _sync(s.device)
            t = time.perf_counter()
            rank_classify(evaluated, feats, candidates, settings, generate_with=tokenizer)
            _sync(s.device)
            out[f"{key}_examples_per_s"] = len(examples) / (time.perf_counter() - t)
    t = time.perf_counter()
    generate(evaluated, s.tokenizer, feats, settings)
    out["generate_examples_per_s"] = len(examples) / (time.perf_counter() - t)
    return out


def measure_eval_precision(method: str, steps: int, model: str = MODEL) -> dict[str, Any]:
    """Does a faster evaluation hold the metric? A short fp32-trained SST-2 run (near chance
    on a random-init model: small margins, the hardest case for rounding), its final
    checkpoint evaluated on the test split in fp32, in TF32 (fp32 with TF32 matmuls: on a
    GPU only) and in bf16: predictions that agree with fp32's, accuracy, loss, time."""
    import torch

    from peftlab.config import resolve_run_config
    from peftlab.evaluate import evaluate_model
    from peftlab.run import restore, run

    cfg = resolve_run_config({
        "model": model, "task": "sst2", "method": method, "train_size": 1000, "val_size": 200,
        "test_size": "all", "seed": 0, "max_steps": steps, "eval_every": steps,
        "selection_metric": "loss",  # the trained checkpoint, not the random step 0
        "precision": "fp32", "eval_precision": "fp32", "output_dir": tempfile.mkdtemp(),
    })
    summary = run(cfg, progress=False)
    s = restore(cfg.output_dir)
    features = s.features("test")
    results, seconds = {}, {}
    precisions = ("fp32", "tf32", "bf16") if s.device.type == "cuda" else ("fp32", "bf16")
    for precision in precisions:
        settings = s.eval_settings("test", progress=False)
        settings.bf16 = precision == "bf16"
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        try:
            t = time.perf_counter()
            results[precision] = evaluate_model(s.model, s.tokenizer, s.task, s.splits.test,
                                                features, settings)
            seconds[precision] = time.perf_counter() - t
        finally:
            torch.set_float32_matmul_precision(before)
    reference = results["fp32"].rows

    def agreement(precision: str) -> float:
        rows = results[precision].rows
        return sum(x["prediction"] == y["prediction"] for x, y in zip(reference, rows)) \
            / len(rows)

    return {"examples": len(reference), "steps": steps, "best_step": summary["best_step"],
            "device": s.device.type, "seconds": seconds,
            "metrics": {p: r.metrics for p, r in results.items()},
            "agreement": agreement("bf16"),
            **({"agreement_tf32": agreement("tf32")} if "tf32" in results else {})}


def measure_reference_eval(shape: str, n: int, batch_size: int, precision: str,
                           max_new_tokens: int | None = None,
                           model: str = MODEL) -> dict[str, Any]:
    """`Seq2SeqTrainer.predict` with `predict_with_generate`, as the HF examples evaluate."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

    cfg, s, _ = _setup("untuned", shape, batch_size, 16, model=model)
    task, src, tgt = SHAPES[shape]
    data = _reference_features(s, s.splits.test[:n], src, tgt)
    args = _reference_args(s, cfg, precision, per_device_eval_batch_size=batch_size,
                           predict_with_generate=True,
                           generation_max_length=max_new_tokens and max_new_tokens + 1)
    collator = DataCollatorForSeq2Seq(s.tokenizer, model=s.model, padding=True,
                                      label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=s.model, args=args, data_collator=collator)
    t = time.perf_counter()
    predictions = trainer.predict(data).predictions
    s.tokenizer.batch_decode(predictions.clip(min=0), skip_special_tokens=True)
    return {"examples": len(data), "examples_per_s": len(data) / (time.perf_counter() - t),
            "generation_max_length": args.generation_max_length}


CELL = {"max_steps": 200, "eval_every": 50, "val_size": 200, "test_size": "all"}


def measure_cell_ours(shape: str, method: str, precision: str, model: str = MODEL,
                      cell: dict[str, Any] | None = None) -> dict[str, Any]:
    """`peftlab train` of one ablation cell: step-0 evaluation included, checkpoints written.
    `cell` replaces the cell's settings (tests run a smaller one)."""
    from peftlab.config import resolve_run_config
    from peftlab.run import run

    task, src, tgt = SHAPES[shape]
    start = time.perf_counter()
    cfg = resolve_run_config({"model": model, "task": task, "method": method, "seed": 0,
                              "train_size": 1000, "precision": precision, **(cell or CELL),
                              "output_dir": tempfile.mkdtemp()})
    summary = run(cfg, progress=False)
    return {"seconds": time.perf_counter() - start, "phases": summary["time_s"],
            "test_metrics": summary["test_metrics"],
            "test_examples": _count_lines(Path(cfg.output_dir) / "predictions" / "test.jsonl")}


def _count_lines(path: Path) -> int:
    return sum(1 for _ in path.open())


def measure_cell_reference(shape: str, method: str, precision: str, model: str = MODEL,
                           cell: dict[str, Any] | None = None) -> dict[str, Any]:
    """The same cell as the HF examples would run it: Seq2SeqTrainer evaluating with
    `predict_with_generate` every 50 steps, keeping the best checkpoint by the validation
    metric (`load_best_model_at_end`), then `predict` on the test split."""
    import numpy as np
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

    cell = cell or CELL
    start = time.perf_counter()
    task, src, tgt = SHAPES[shape]
    cfg, s, _ = _setup(method, shape, 8, 1000, model=model, pack=False, **cell)
    train_data = _reference_features(s, s.splits.train, src, tgt)
    val_data = _reference_features(s, s.splits.validation, src, tgt)
    test_data = _reference_features(s, s.splits.test, src, tgt)
    metric = s.task.primary_metric

    def compute_metrics(pred) -> dict[str, float]:
        ids = np.where(pred.predictions < 0, s.tokenizer.pad_token_id, pred.predictions)
        texts = [t.strip() for t in s.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        labels = np.where(pred.label_ids < 0, s.tokenizer.pad_token_id, pred.label_ids)
        refs = [t.strip() for t in s.tokenizer.batch_decode(labels, skip_special_tokens=True)]
        if shape == "sst2":
            return {metric: float(np.mean([p == r for p, r in zip(texts, refs)]))}
        from rouge_score import rouge_scorer

        from peftlab.tasks.base import split_sentences

        scorer = rouge_scorer.RougeScorer([metric], use_stemmer=True)
        return {metric: float(np.mean([
            scorer.score(split_sentences(r), split_sentences(p))[metric].fmeasure
            for p, r in zip(texts, refs)]))}

    args = _reference_args(
        s, cfg, precision, max_steps=cell["max_steps"],
        warmup_steps=math.ceil(cfg.warmup_ratio * cell["max_steps"]),
        logging_steps=cfg.log_every, eval_strategy="steps", eval_steps=cell["eval_every"],
        save_strategy="steps", save_steps=cell["eval_every"], save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model=metric, greater_is_better=True,
        per_device_eval_batch_size=cfg.eval_batch_size, predict_with_generate=True,
        generation_max_length=cfg.max_new_tokens + 1,
    )
    collator = DataCollatorForSeq2Seq(s.tokenizer, model=s.model, padding=True,
                                      label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=s.model, args=args, train_dataset=train_data,
                             eval_dataset=val_data, data_collator=collator,
                             compute_metrics=compute_metrics)
    evaluations: list[float] = []  # the Trainer's loop calls self.evaluate: timed here
    evaluate = trainer.evaluate

    def timed_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        began = time.perf_counter()
        try:
            return evaluate(*args, **kwargs)
        finally:
            evaluations.append(time.perf_counter() - began)

    trainer.evaluate = timed_evaluate
    began = time.perf_counter()
    setup_s = began - start
    trainer.train()
    training_s = time.perf_counter() - began - sum(evaluations)
    began = time.perf_counter()
    test = trainer.predict(test_data)
    test_s = time.perf_counter() - began
    return {"seconds": time.perf_counter() - start, "test_metrics": test.metrics,
            "test_examples": len(test_data), "evaluations": len(evaluations),
            "phases": {"setup": setup_s, "training": training_s, "validation": sum(evaluations),
                       "test": test_s}}


def measure_grid(runs_per_gpu: int, n_runs: int, model: str = MODEL,
                 max_steps: int = CELL["max_steps"]) -> dict[str, Any]:
    """`n_runs` SST-2 LoRA cells through the study runner with `runs_per_gpu` workers (on
    CPU, each worker gets the CPUs divided by the number of workers)."""
    from peftlab.config import resolve_run_config
    from peftlab.device import gpu_count, threads_per_worker
    from peftlab.study import Cell, execute

    root = Path(tempfile.mkdtemp())
    cells = [Cell(f"seed{i}", resolve_run_config({
        "model": model, "task": "sst2", "method": "lora", "seed": i, "train_size": 1000,
        **CELL, "max_steps": max_steps, "eval_every": max(1, max_steps // 4),
        "cpu_threads": threads_per_worker(runs_per_gpu),
        "output_dir": str(root / f"seed{i}")}), {"seed": i}) for i in range(n_runs)]
    start = time.perf_counter()
    counts = execute(cells, workers=runs_per_gpu, runs_per_gpu=runs_per_gpu,
                     progress=False).counts
    seconds = time.perf_counter() - start
    cuda = gpu_count() > 0
    return {"runs": n_runs, "max_steps": max_steps, "seconds": seconds,
            "runs_per_hour": 3600 * n_runs / seconds, "statuses": counts,
            "device": "cuda" if cuda else "cpu",
            "threads_per_run": None if cuda else threads_per_worker(runs_per_gpu)}


# a pack-section cell: short, with step-0, middle and final evaluations and a test split
PACK_CELL = {"max_steps": 20, "eval_every": 10, "log_every": 10, "train_size": 256,
             "val_size": 32, "test_size": 32, "batch_size": 8}
PACK_METHOD_ARGS = {"prompt": {"num_virtual_tokens": 20}, "prefix": {"num_prefix_tokens": 20}}


def measure_pack(method: str, shape: str, pack: int, n_runs: int, workers: int | None = None,
                 model: str = MODEL, cell: dict[str, Any] | None = None,
                 matmul_size: int | None = None) -> dict[str, Any]:
    """`n_runs` cells of one method and shape, differing only in seed, through the study
    runner in packs of `pack` (1: every run alone): runs per hour, and the MFU of their
    training steps: the steps' useful FLOPs (real tokens, `model_flops`) over the wall time
    and the matmul peak measured in this process (evaluation FLOPs are not counted: a lower
    bound). Workers: `workers` (on a GPU, runs or packs sharing it), else on CPU one per pack
    up to the number of CPUs, the CPUs split between them."""
    import torch
    from transformers import AutoConfig

    from peftlab.config import resolve_run_config
    from peftlab.data import tokenize, training_batches
    from peftlab.device import gpu_count, threads_per_worker
    from peftlab.models import PRESETS, default_tokenizer_for, load_tokenizer, preset_config
    from peftlab.study import Cell, execute, packs
    from peftlab.tasks import build_task, prepare_splits

    task_name, src, tgt = SHAPES[shape]
    settings = {**PACK_CELL, **(cell or {})}
    cuda = gpu_count() > 0
    # on a CPU, a worker per CPU: packs are split to fill them (peftlab.study.packs)
    workers = workers or (1 if cuda else min(n_runs, os.cpu_count() or 1))
    root = Path(tempfile.mkdtemp())

    def config(seed: int) -> Any:
        return resolve_run_config({
            "model": model, "task": task_name, "method": method, "seed": seed,
            "method_args": PACK_METHOD_ARGS.get(method, {}), "max_source_length": src,
            "max_target_length": tgt, **settings,
            # the host's CPUs split between the workers, on a GPU too (8 workers of 16
            # threads each oversubscribed a 16-core host and slowed the 8-process baseline)
            "cpu_threads": threads_per_worker(workers),
            "output_dir": str(root / f"seed{seed}")})

    cells = [Cell(f"seed{i}", config(i), {"seed": i}) for i in range(n_runs)]
    start = time.perf_counter()
    counts = execute(cells, workers=workers, runs_per_gpu=workers, progress=False,
                     pack=pack).counts
    seconds = time.perf_counter() - start
    # the training steps' useful FLOPs: the runs' own batches, counted again
    cfg = cells[0].config
    task = build_task(cfg.task, cfg.task_args)
    tokenizer = load_tokenizer(cfg.tokenizer or default_tokenizer_for(cfg.model))
    model_config = preset_config(model) if model in PRESETS else AutoConfig.from_pretrained(model)
    flops = 0.0
    for c in cells:
        feats = tokenize(tokenizer, prepare_splits(task, c.config.train_size, c.config.val_size,
                                                   c.config.test_size, c.config.seed).train,
                         c.config.max_source_length, c.config.max_target_length)
        batches = training_batches(feats, c.config.batch_size, c.config.seed, 0)
        for _ in range(c.config.max_steps):
            b = next(batches)
            flops += model_flops(model_config, (b["attention_mask"].sum(1)).tolist(),
                                 ((b["labels"] != -100).sum(1)).tolist(), method == "full")
    peak = measure_matmul(matmul_size)
    precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return {"method": method, "shape": shape, "pack": pack, "runs": n_runs, "workers": workers,
            "packs": len(packs(cells, pack, slots=1 if cuda else workers)), "seconds": seconds,
            "runs_per_hour": 3600 * n_runs / seconds, "statuses": counts,
            "train_flops": flops, "peak_flops_per_s": peak[f"{precision}_flops_per_s"],
            "mfu": flops / seconds / peak[f"{precision}_flops_per_s"],
            "device": "cuda" if cuda else "cpu", "settings": settings}


def measure_study(preset: str, pack: int, workers: int | None = None) -> dict[str, Any]:
    """A built-in study (`peftlab run --preset`) in packs of `pack`: its wall time."""
    from peftlab.study import execute, expand, load_study, packs, plan

    study = load_study(preset=preset)
    cells = expand(study, Path(tempfile.mkdtemp()))
    todo = plan(cells).todo
    workers = workers or min(len(todo), os.cpu_count() or 1)
    groups = packs(todo, pack, slots=workers)
    start = time.perf_counter()
    counts = execute(todo, workers=workers, progress=False, pack=pack).counts
    seconds = time.perf_counter() - start
    return {"preset": preset, "pack": pack, "runs": len(todo), "packs": len(groups),
            "workers": workers, "seconds": seconds, "runs_per_hour": 3600 * len(todo) / seconds,
            "statuses": counts}


def measure_matmul(size: int | None = None, repeats: int = 10) -> dict[str, float]:
    import torch

    out: dict[str, float] = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = size or (8192 if device == "cuda" else 2048)  # a GPU needs big ones to reach peak
    out["size"] = size
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        out[f"{name}_flops_per_s"] = 2 * size**3 * repeats / (time.perf_counter() - t)
    return out


WORKERS = {"ours": measure_ours, "reference": measure_reference, "eval": measure_eval,
           "reference-eval": measure_reference_eval, "matmul": measure_matmul,
           "ours-losses": measure_ours_losses, "curve": measure_curve,
           "cell-ours": measure_cell_ours, "cell-reference": measure_cell_reference,
           "grid": measure_grid, "eval-precision": measure_eval_precision,
           "pack": measure_pack, "study": measure_study}


def subprocess_measure(kind: str, **kwargs: Any) -> dict[str, Any]:
    """Run one measurement in a fresh Python process; return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "peftlab.bench", kind, json.dumps(kwargs), f.name]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
        return json.loads(Path(f.name).read_text())


def paired(ours_kind: str, reference_kind: str, kwargs: dict[str, Any], repeats: int,
           rate: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    """peftlab and the reference measured back to back `repeats` times, alternating which
    goes first; `rate` is higher-is-better (examples/s, 1/seconds).

    On a shared host the machine's speed drifts between minutes (on the 2-core CPU these
    figures come from, the reference's own rate moved by up to 45% between runs of the same
    command), so one pair's ratio can be off by as much. Each ratio is taken from one
    back-to-back pair, and the median of the pairs' ratios is reported with all of them;
    `ours` and `reference` are the runs with the median rate; `runs` holds every run.
    """
    ours_runs, reference_runs = [], []
    for i in range(repeats):
        first_ours = i % 2 == 0
        for kind in (ours_kind, reference_kind) if first_ours else (reference_kind, ours_kind):
            (ours_runs if kind == ours_kind else reference_runs).append(
                subprocess_measure(kind, **kwargs))
    if any("error" in r for r in ours_runs + reference_runs):
        return {"ours": next((r for r in ours_runs if "error" in r), ours_runs[0]),
                "reference": next((r for r in reference_runs if "error" in r),
                                  reference_runs[0])}
    ratios = [rate(o) / rate(f) for o, f in zip(ours_runs, reference_runs)]
    return {"ours": _median_run(ours_runs, rate), "reference": _median_run(reference_runs, rate),
            "speedup": statistics.median(ratios), "speedups": ratios,
            "runs": {"ours": ours_runs, "reference": reference_runs}}


def _median_run(runs: list[dict[str, Any]], rate: Callable[[dict[str, Any]], float]
                ) -> dict[str, Any]:
    return sorted(runs, key=rate)[len(runs) // 2]


# --- the benchmark -------------------------------------------------------------------------

def run_benchmark(out_dir: Path, methods: list[str], shapes: list[str], steps: int,
                  warmup: int, precision: str, sections: list[str], model: str = MODEL,
                  curve_steps: int = 100, grid_runs: int = 2, grid_steps: int = 200,
                  runs_per_gpu: tuple[int, ...] = (1, 2, 4, 8), keep: bool = False,
                  repeats: int = 1, pack_sizes: tuple[int, ...] = (4, 8, 16),
                  pack_runs: int = 16, pack_study: str | None = "smoke",
                  log: Any = print) -> dict[str, Any]:
    import torch

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown bench section(s) {unknown}; choose from {list(SECTIONS)}")
    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "model": model, "precision": precision,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
                   + (f", {torch.cuda.get_device_name(0)}" if cuda else ""),
        "torch": torch.__version__, "steps": steps, "warmup": warmup,
        "curve_steps": curve_steps,
    }
    previous = out_dir / "bench.json"
    if keep and previous.is_file():  # add to the sections measured before in the same setting
        old = json.loads(previous.read_text())
        same = ("machine", "torch", "model", "precision", "steps", "warmup", "curve_steps")
        if all(old.get(k) == results[k] for k in same):
            results = {**old, **results}
        else:
            log(f"{previous}: measured in another setting; not kept")
    m = {"model": model}

    def save(section: str, value: Any) -> None:
        results[section] = value
        log(f"{section}: {json.dumps(_short(value))}")
        _save(out_dir, results)

    if "matmul" in sections or "train" in sections:
        save("matmul", subprocess_measure("matmul"))
    if "train" in sections:
        table = dict(results.get("train", {}))
        for shape in shapes:
            for method in methods:
                kw = dict(method=method, shape=shape, batch_size=8, steps=steps, warmup=warmup,
                          precision=precision, **m)
                row = paired("ours", "reference", kw, repeats, lambda r: r["examples_per_s"])
                if "speedup" in row:
                    row["mfu"] = row["ours"]["mfu"]
                table[f"{shape}/{method}"] = row
                save("train", table)
    if "mfu" in sections:
        table = dict(results.get("mfu", {}))
        for mfu_precision in ("fp32", "bf16"):
            for batch_size in MFU_BATCH_SIZES:
                table[f"{mfu_precision}/{batch_size}"] = subprocess_measure(
                    "ours", method="full", shape="sst2", batch_size=batch_size, steps=steps,
                    warmup=warmup, precision=mfu_precision, **m)
                save("mfu", table)
    if "numerics" in sections:
        save("numerics", {method: measure_numerics(method, 8, model)
                          for method in ("lora", "full")})
    if "bf16" in sections:
        table = dict(results.get("bf16", {}))
        for method in ("lora", "full"):
            kw = dict(method=method, shape="sst2", steps=curve_steps, **m)
            fp32 = subprocess_measure("curve", precision="fp32", **kw)
            bf16 = subprocess_measure("curve", precision="bf16", **kw)
            table[method] = _compare_curves(fp32, bf16, "fp32", "bf16")
            save("bf16", table)
    if "bf16_eval" in sections:
        table = dict(results.get("bf16_eval", {}))
        for method in ("lora", "full"):
            table[method] = subprocess_measure("eval-precision", method=method,
                                               steps=curve_steps, **m)
            save("bf16_eval", table)
    if "batching" in sections:
        table = dict(results.get("batching", {}))
        for shape in shapes:
            kw = dict(method="lora", shape=shape, batch_size=8, steps=steps, warmup=warmup,
                      precision=precision, **m)
            grouped = subprocess_measure("ours", group_by_length=True, **kw)
            random = subprocess_measure("ours", group_by_length=False, **kw)
            row: dict[str, Any] = {"grouped": grouped, "random": random}
            if "error" not in grouped and "error" not in random:
                row["speedup"] = grouped["examples_per_s"] / random["examples_per_s"]
            if shape == "sst2":  # the metric after training, both ways (SAMSum: too slow here)
                ckw = dict(method="lora", shape=shape, steps=curve_steps, precision=precision,
                           **m)
                row["curves"] = _compare_curves(
                    subprocess_measure("curve", group_by_length=False, **ckw),
                    subprocess_measure("curve", group_by_length=True, **ckw), "random", "grouped")
            table[shape] = row
            save("batching", table)
    if "eval" in sections:
        table = dict(results.get("eval", {}))
        if "sst2" in shapes:
            ours = subprocess_measure("eval", shape="sst2", n=872, batch_size=64, **m)
            fp32 = (subprocess_measure("eval", shape="sst2", n=872, batch_size=64, bf16=False, **m)
                    if ours.get("bf16") else ours)
            ref_kw = dict(shape="sst2", n=872, batch_size=64, precision=precision, **m)
            # An untrained model never stops early, so the reference generates to its
            # default limit (20 tokens); a trained one stops after the label word: `short`.
            ref = subprocess_measure("reference-eval", **ref_kw)
            ref_short = subprocess_measure("reference-eval", max_new_tokens=4, **ref_kw)
            table["sst2"] = {"ours": ours, "ours_fp32": fp32, "reference": ref,
                             "reference_short": ref_short}
            if all("error" not in r for r in (ours, fp32, ref, ref_short)):
                rank = ours["rank_examples_per_s"]
                table["sst2"].update({
                    "rank_vs_own_generation": rank / ours["generate_examples_per_s"],
                    "rank_vs_reference": rank / ref["examples_per_s"],
                    "rank_vs_reference_short": rank / ref_short["examples_per_s"],
                    "rank_fp32_vs_reference": fp32["rank_examples_per_s"] / ref["examples_per_s"]})
            save("eval", table)
        if "samsum" in shapes:
            n = 819 if cuda else 64
            ours = subprocess_measure("eval", shape="samsum", n=n, batch_size=32, **m)
            ref = subprocess_measure("reference-eval", shape="samsum", n=n, batch_size=32,
                                     precision=precision, max_new_tokens=96, **m)
            table["samsum"] = {"ours": ours, "reference": ref}
            if "error" not in ours and "error" not in ref:
                table["samsum"]["speedup"] = (ours["generate_examples_per_s"]
                                              / ref["examples_per_s"])
            save("eval", table)
    if "cell" in sections:
        table = dict(results.get("cell", {}))
        for shape in shapes:
            kw = dict(shape=shape, method="lora", precision=precision, **m)
            table[shape] = paired("cell-ours", "cell-reference", kw, repeats,
                                  lambda r: 1 / r["seconds"])
            save("cell", table)
    if "grid" in sections:
        table = dict(results.get("grid", {}))
        # on CPU the workers split the cores: more workers than CPUs would only oversubscribe
        for n in runs_per_gpu if cuda else [n for n in runs_per_gpu if n <= (os.cpu_count() or 1)]:
            table[str(n)] = subprocess_measure("grid", runs_per_gpu=n, n_runs=grid_runs * n,
                                               max_steps=grid_steps, **m)
            save("grid", table)
    if "pack" in sections:
        table = dict(results.get("pack", {}))
        # the same runs unpacked and in packs of each size, side by side; on a GPU also
        # unpacked with runs_per_gpu[-1] runs sharing it (the best the grid section measured)
        gpu_shared = max(runs_per_gpu) if cuda else None
        for shape in shapes:
            for method in [x for x in methods if x != "full"]:
                rows = {}
                kw = dict(method=method, shape=shape, n_runs=pack_runs, **m)
                rows["1"] = subprocess_measure("pack", pack=1, workers=1 if cuda else None, **kw)
                if gpu_shared:
                    rows[f"1x{gpu_shared}"] = subprocess_measure("pack", pack=1,
                                                                 workers=gpu_shared, **kw)
                for size in pack_sizes:
                    rows[str(size)] = subprocess_measure("pack", pack=size,
                                                         workers=1 if cuda else None, **kw)
                table[f"{shape}/{method}"] = rows
                save("pack", table)
        if pack_study:
            table["study"] = {str(size): subprocess_measure("study", preset=pack_study, pack=size)
                              for size in (1, *pack_sizes)}
            save("pack", table)
    _save(out_dir, results)
    return results


def _compare_curves(a: dict, b: dict, name_a: str, name_b: str) -> dict[str, Any]:
    out: dict[str, Any] = {name_a: a, name_b: b}
    if "error" in a or "error" in b:
        return out
    diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    out.update({"max_abs_loss_diff": max(diffs), "mean_abs_loss_diff": sum(diffs) / len(diffs),
                "final_loss": {name_a: a["losses"][-1], name_b: b["losses"][-1]},
                "val_metric": {name_a: a["val_metric"], name_b: b["val_metric"]},
                "speedup": b["examples_per_s"] / a["examples_per_s"]})
    return out


def _short(value: Any) -> Any:
    """The log line of a section: numbers rounded, curves and repeated runs left out."""
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items() if k not in ("losses", "steps")
                and not (k == "runs" and isinstance(v, dict))}
    if isinstance(value, float):
        return round(value, 3)
    return value


def _save(out_dir: Path, results: dict) -> None:
    from peftlab.files import atomic_write_text, write_json

    write_json(out_dir / "bench.json", results)
    atomic_write_text(out_dir / "bench.md", markdown(results))


def _f(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "–"


def markdown(r: dict) -> str:
    lines = [f"# peftlab benchmark ({r['date']}, {r['machine']}, torch {r['torch']}, "
             f"{r['model']}, {r['precision']})", ""]
    if "matmul" in r and "error" not in r["matmul"]:
        m = r["matmul"]
        scale, unit = (1e12, "TFLOP/s") if m["fp32_flops_per_s"] > 5e12 else (1e9, "GFLOP/s")
        lines += [f"Measured matmul peak ({m.get('size', 2048)}x{m.get('size', 2048)}): fp32 "
                  f"{m['fp32_flops_per_s'] / scale:.0f} {unit}, bf16 "
                  f"{m['bf16_flops_per_s'] / scale:.0f} {unit}. MFU is against the peak of "
                  "the precision used, measured in the same process right after the timed "
                  "steps.", ""]
    if "train" in r:
        columns = ["shape/method", "peftlab ex/s", "reference ex/s", "speedup", "peftlab tok/s",
                   "MFU", "peftlab peak MB", "reference peak MB"]
        lines += _table(f"## Training throughput, batch 8, {r['steps']} timed steps after "
                        f"{r['warmup']} warm-up", columns)
        for key, row in r["train"].items():
            o, f = row["ours"], row["reference"]
            if "error" in o or "error" in f:
                lines.append(_row([key, o.get("error", ""), f.get("error", "")], len(columns)))
                continue
            mfu = 100 * row["mfu"] if row.get("mfu") is not None else None
            mfu_fmt = ".1f" if mfu is None or mfu >= 1 else ".2g"  # a GPU's are tiny
            lines.append(_row([key, f"{o['examples_per_s']:.2f}", f"{f['examples_per_s']:.2f}",
                               _speedup(row), f"{o['tokens_per_s']:.0f}",
                               f"{_f(mfu, mfu_fmt)}%", f"{o['peak_memory_mb']:.0f}",
                               f"{f['peak_memory_mb']:.0f}"], len(columns)))
        lines.append("")
    if "mfu" in r:
        columns = ["precision", "batch", "examples/s", "model FLOP/s", "matmul peak", "MFU"]
        lines += _table(f"## Full fine-tuning's MFU by batch size (SST-2 shapes, {r['steps']} "
                        f"timed steps after {r['warmup']} warm-up)", columns)
        for key, o in r["mfu"].items():
            precision, batch = key.split("/")
            if "error" in o:
                lines.append(_row([precision, batch, f"error: {o['error']}"], len(columns)))
                continue
            scale, unit = (1e12, "T") if o["peak_flops_per_s"] > 5e12 else (1e9, "G")
            lines.append(_row([precision, batch, f"{o['examples_per_s']:.2f}",
                               f"{o['flops_per_s'] / scale:.1f} {unit}",
                               f"{o['peak_flops_per_s'] / scale:.0f} {unit}",
                               f"{_f(100 * o['mfu'], '.1f')}%"], len(columns)))
        lines.append("")
    if "numerics" in r:
        lines += ["## Numerics", "", "Same batches, same order, fp32 (8 steps): max |loss "
                  "difference| peftlab vs reference: " + ", ".join(
                      f"{k} {_f(v.get('max_abs_diff'), '.2e')}" for k, v in r["numerics"].items()),
                  ""]
    if "bf16" in r:
        columns = ["method", "bf16 speedup", "max abs loss diff", "mean abs loss diff",
                   "val metric fp32", "val metric bf16"]
        lines += _table(f"## bf16 autocast vs fp32 (SST-2, {r['curve_steps']} steps, same seed)",
                        columns)
        for method, c in r["bf16"].items():
            if "speedup" not in c:
                error = c["fp32"].get("error") or c["bf16"].get("error")
                lines.append(_row([method, f"error: {error}"], len(columns)))
                continue
            lines.append(_row([method, f"{c['speedup']:.2f}x", f"{c['max_abs_loss_diff']:.4f}",
                               f"{c['mean_abs_loss_diff']:.4f}", f"{c['val_metric']['fp32']:.2f}",
                               f"{c['val_metric']['bf16']:.2f}"], len(columns)))
        lines.append("")
    if "bf16_eval" in r:
        columns = ["method", "test examples", "same prediction", "accuracy fp32", "accuracy bf16",
                   "loss fp32", "loss bf16", "eval s fp32", "eval s bf16"]
        lines += _table(f"## One fp32-trained checkpoint ({r['curve_steps']} steps, SST-2) "
                        "evaluated in fp32 and in bf16", columns)
        for method, c in r["bf16_eval"].items():
            if "error" in c:
                lines.append(_row([method, f"error: {c['error']}"], len(columns)))
                continue
            a, b = c["metrics"]["fp32"], c["metrics"]["bf16"]
            lines.append(_row([method, str(c["examples"]), f"{c['agreement']:.1%}",
                               f"{a['accuracy']:.2f}", f"{b['accuracy']:.2f}", f"{a['loss']:.4f}",
                               f"{b['loss']:.4f}", f"{c['seconds']['fp32']:.1f}",
                               f"{c['seconds']['bf16']:.1f}"], len(columns)))
        lines.append("")
    if "batching" in r:
        columns = ["shape", "padding grouped", "padding random", "speedup", "val metric random",
                   "val metric grouped"]
        lines += _table("## Length-grouped vs random batches (LoRA)", columns)
        for shape, row in r["batching"].items():
            g, rn = row["grouped"], row["random"]
            c = row.get("curves", {}).get("val_metric", {})
            lines.append(_row([shape, _f(g.get("padding_fraction"), ".1%"),
                               _f(rn.get("padding_fraction"), ".1%"),
                               f"{_f(row.get('speedup'), '.2f')}x", _f(c.get("random"), ".2f"),
                               _f(c.get("grouped"), ".2f")], len(columns)))
        lines.append("")
    if "eval" in r:
        lines += ["## Evaluation", ""]
        e = r["eval"].get("sst2")
        if e and "rank_vs_reference" in e:
            o = e["ours"]
            precision = "bf16" if o.get("bf16") else "fp32"
            fp32 = e.get("ours_fp32", o)
            lines += [
                f"SST-2 test ({o['examples']} examples, batch 64), peftlab in its validation "
                f"precision here, {precision}: rank classification "
                f"{o['rank_examples_per_s']:.1f} ex/s (fp32: {fp32['rank_examples_per_s']:.1f}); "
                "rank classification plus free generation from the same encoder pass (the test "
                f"split's work) {_f(o.get('rank_and_generate_examples_per_s'), '.1f')} ex/s "
                f"(fp32: {_f(fp32.get('rank_and_generate_examples_per_s'), '.1f')}); "
                f"peftlab's own sorted generation {o['generate_examples_per_s']:.1f} ex/s "
                f"({e['rank_vs_own_generation']:.1f}x). Reference `predict_with_generate` (fp32) "
                f"{e['reference']['examples_per_s']:.1f} ex/s with its default length limit "
                f"(an untrained model never stops early): rank classification "
                f"{e['rank_vs_reference']:.1f}x faster "
                f"(fp32: {_f(e.get('rank_fp32_vs_reference'), '.1f')}x); "
                f"{e['reference_short']['examples_per_s']:.1f} ex/s when capped at the label "
                f"word's length ({e['rank_vs_reference_short']:.1f}x).", ""]
        e = r["eval"].get("samsum")
        if e and "speedup" in e:
            lines += [f"SAMSum greedy generation ({e['ours']['examples']} test examples, batch "
                      f"32, up to 96 new tokens): peftlab {e['ours']['generate_examples_per_s']:.2f}"
                      f" ex/s (length-sorted), reference {e['reference']['examples_per_s']:.2f} "
                      f"ex/s ({e['speedup']:.2f}x).", ""]
    if "cell" in r:
        columns = ["task", "peftlab s", "reference s", "speedup", "peftlab test", "reference test"]
        lines += _table("## One ablation cell end to end (LoRA, 200 steps, validation every 50 on "
                        "200 examples, full test split)", columns)
        for shape, row in r["cell"].items():
            o, f = row["ours"], row["reference"]
            if "speedup" not in row:
                lines.append(_row([shape, o.get("error", ""), f.get("error", "")], len(columns)))
                continue
            lines.append(_row([shape, f"{o['seconds']:.1f}", f"{f['seconds']:.1f}",
                               _speedup(row), _metrics(o["test_metrics"]),
                               _metrics(f["test_metrics"])], len(columns)))
        lines.append("")
        for shape, row in r["cell"].items():
            o, f = row["ours"], row["reference"]
            if "phases" in o and "phases" in f:
                lines += [f"Where the {shape} cell's seconds went (the runs above): peftlab "
                          f"{_phases(o['phases'])}; reference {_phases(f['phases'])}. Validation "
                          "includes peftlab's step-0 evaluation, which the reference does not run.",
                          ""]
    if "pack" in r:
        # `packs`: what ran, where `pack` is the limit (packs are split to fill the workers)
        columns = ["cells", "pack", "packs", "workers", "runs", "seconds", "runs/hour",
                   "vs unpacked", "MFU (training)"]
        first = next((row for rows in r["pack"].values() for row in rows.values()
                      if "settings" in row), {})
        lines += _table("## Packed training (`peftlab run --pack P`): the same runs unpacked "
                        f"and in packs ({first.get('settings', {})})", columns)
        for name, rows in r["pack"].items():
            base = rows.get("1", {}).get("runs_per_hour")
            for size, row in rows.items():
                if "error" in row:
                    lines.append(_row([name, size, f"error: {row['error']}"], len(columns)))
                    continue
                gain = f"{row['runs_per_hour'] / base:.2f}x" if base else "–"
                lines.append(_row([name, size, str(row.get("packs", "")),
                                   str(row.get("workers", "")), str(row["runs"]),
                                   _f(row["seconds"], ".1f"), _f(row["runs_per_hour"], ".0f"),
                                   gain, _f(row.get("mfu"), ".2%")], len(columns)))
        lines.append("")
    if "grid" in r:
        columns = ["N", "runs", "steps per run", "seconds", "runs/hour"]
        title = ("## Grid throughput on one GPU (`--runs-per-gpu N`, SST-2 LoRA cells)"
                 if all(row.get("device", "cuda") == "cuda" for row in r["grid"].values()) else
                 "## Grid throughput on this CPU (`peftlab run STUDY --workers N`: N runs at once, "
                 "the CPUs split between them; SST-2 LoRA cells)")
        lines += _table(title, columns)
        for n, row in sorted(r["grid"].items(), key=lambda kv: int(kv[0])):
            cells = ([n, f"error: {row['error']}"] if "error" in row else
                     [n, str(row.get("runs", "")), str(row.get("max_steps", "")),
                      _f(row.get("seconds"), ".1f"), _f(row.get("runs_per_hour"), ".0f")])
            lines.append(_row(cells, len(columns)))
        lines.append("")
    return "\n".join(lines)


def _speedup(row: dict) -> str:
    """The median ratio; with several back-to-back pairs, their range and count."""
    ratios = row.get("speedups", [row["speedup"]])
    if len(ratios) == 1:
        return f"{row['speedup']:.2f}x"
    return f"{row['speedup']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x, {len(ratios)} pairs)"


def _phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())


def _table(title: str, columns: list[str]) -> list[str]:
    return [title, "", _row(columns, len(columns)), "|" + "---|" * len(columns)]


def _row(cells: list[str], width: int) -> str:
    """A Markdown table row; cells missing at the end are left empty."""
    return "| " + " | ".join(cells) + " |" + " |" * (width - len(cells))


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{k.removeprefix('test_')} {v:.3f}" for k, v in metrics.items()
                     if isinstance(v, float) and not k.endswith(("runtime", "per_second", "loss")))


if __name__ == "__main__":  # a measurement subprocess: kind, JSON kwargs, output file
    kind, kwargs, out_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    Path(out_file).write_text(json.dumps(WORKERS[kind](**kwargs)))
