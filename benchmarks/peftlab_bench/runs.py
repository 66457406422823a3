"""Whole runs: one ablation cell end to end, runs per hour through the study runner
(workers, GPUs shared, packs) and a built-in study's wall time."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from peftlab_bench.common import CELL, MODEL, SHAPES, model_flops
from peftlab_bench.training import measure_matmul


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
