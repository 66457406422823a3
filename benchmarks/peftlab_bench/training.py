"""Training measurements: peftlab's loop, its losses and curves, the matmul peak."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from peftlab_bench.common import MODEL, SHAPES, model_flops, peak_memory, setup, subprocess_measure, sync


def measure_ours(method: str, shape: str, batch_size: int, steps: int, warmup: int,
                 precision: str, model: str = MODEL, group_by_length: bool = True,
                 ) -> dict[str, Any]:
    from peftlab.data import training_batches
    from peftlab.loop import train

    memory = peak_memory()
    cfg, s, features = setup(method, shape, batch_size, 256, model=model)
    cfg = cfg.model_copy(update={"max_steps": warmup + steps, "log_every": warmup,
                                 "eval_every": 10**9, "warmup_ratio": 0.0,
                                 "precision": precision, "group_by_length": group_by_length})
    bf16 = precision == "bf16"
    rows: list[dict] = []
    metric = s.task.primary_metric

    def at_eval() -> dict[str, float]:  # the last step's "evaluation": only a clock sync
        sync(s.device)
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


def measure_numerics(method: str, steps: int, model: str = MODEL) -> dict[str, Any]:
    """Same batches, same order, fp32: per-step losses of both pipelines."""
    import numpy as np

    from peftlab.data import length_grouped_batches

    cfg, s, features = setup(method, "sst2", 8, 64, dropout=False, model=model)
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

    cfg, s, features = setup(method, "sst2", 8, 64, dropout=False, model=model)
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
