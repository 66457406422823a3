"""The seed-study preset's wall time on this device, projected from measured parts: per task
and method, a packed training step of a pack of the preset's cells (3 rates x 3 seeds x 3
train sizes = 27 members; full fine-tuning alone), and a validation and a test pass of the
pack (measured on a subset, scaled to the preset's split sizes), on the Flan-T5-small
geometry; and the MFU of the training steps against the bf16 matmul peak measured here.

    python benchmarks/gpu_projection.py --device cuda --out OUT [--members 27] [--steps 4]

Projection per (task, method, size) group of the preset: 600 steps x the packed step, 7
validation passes (steps 0, 100, ..., 600) and one test pass; every size of a method costs
what its measured default size costs (a lower bound for the larger prompts and prefixes).
Printed against the goals: <= 1 hour, moonshot 15 minutes. `--device cpu --model t5-tiny
--members 3` runs it on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from peftlab.config import resolve_run_config
from peftlab.data import training_batches
from peftlab.dropout import MemberMasks, member_dropout
from peftlab.models import PRESETS, preset_config
from peftlab.pack import step_gradients
from peftlab.run import evaluate_pack, setup_pack
from peftlab.study import load_study
from peftlab_bench.common import model_flops
from peftlab_bench.training import measure_matmul

METHODS = ("lora", "prompt", "prefix", "ia3", "ln", "full")


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(task: str, method: str, members: int, steps: int, model: str, device: str,
            subset: int, settings: dict) -> dict:
    root = Path(tempfile.mkdtemp())
    packed = members if method != "full" else 1
    cfgs = [resolve_run_config({**settings, "model": model, "task": task, "method": method,
                                "seed": m, "device": device, "precision": "bf16",
                                "val_size": subset, "test_size": subset,
                                "output_dir": str(root / f"m{m}")}) for m in range(packed)]
    setups = setup_pack(cfgs)
    s0 = setups[0]
    dev = s0.device
    model_ = s0.model.train()
    params = [[p for _, p in model_.peftlab_pack.parameters(m)] for m in range(packed)]
    optimizers = [torch.optim.AdamW(p, lr=1e-4) for p in params]
    masks = MemberMasks([c.seed for c in cfgs], dev)
    draws = [training_batches(s.features("train"), s.cfg.batch_size, s.cfg.seed,
                              s.tokenizer.pad_token_id) for s in setups]
    times, flops = [], 0.0
    geometry = preset_config(model) if model in PRESETS else s0.model.config
    for step in range(steps + 1):
        batches = [[next(d)] for d in draws]
        began = clock(dev)
        with member_dropout(model_, masks):
            step_gradients(model_.peftlab_pack, batches, dev, True, s0.tokenizer.pad_token_id,
                           masks)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(clock(dev) - began)
            flops += sum(model_flops(geometry, b[0]["attention_mask"].sum(1).tolist(),
                                     (b[0]["labels"] != -100).sum(1).tolist(), method == "full")
                         for b in batches)
    model_.eval()
    evals = {}
    for split in ("validation", "test"):
        began = clock(dev)
        evaluate_pack(setups, split, list(range(packed)), progress=False)
        evals[split] = clock(dev) - began
    return {"task": task, "method": method, "members": packed,
            "step_s": statistics.median(times), "train_flops_per_s": flops / sum(times),
            "validation_s_per_example": evals["validation"] / subset,
            "test_s_per_example": evals["test"] / subset}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="flan-t5-small-random")
    parser.add_argument("--members", type=int, default=27)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--subset", type=int, default=32, help="validation/test examples timed")
    parser.add_argument("--tasks", default="sst2,samsum")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    study = load_study(preset="seed-study")
    peak = measure_matmul(None)
    bf16_peak = peak.get("bf16_flops_per_s") or peak["fp32_flops_per_s"]
    total, rows = 0.0, []
    for task in args.tasks.split(","):
        settings = {**study.base, **study.tasks[task]}
        settings.pop("model", None)
        sizes = {"sst2": (872, 200), "samsum": (819, 200)}[task]  # test, validation examples
        for method in args.methods.split(","):
            spec = next(m for m in study.methods if m.method == method)
            m = measure(task, method, args.members, args.steps, args.model, args.device,
                        args.subset, {k: v for k, v in settings.items()
                                      if k not in ("val_size", "test_size")})
            cells = len(spec.learning_rates or [1]) * len(study.seeds) * len(study.train_sizes)
            groups = max(1, len(next(iter(spec.sizes.values()), [None])))  # the size knob
            per_group_runs = cells if method != "full" else 1
            packs = cells / per_group_runs
            steps, passes = study.base["max_steps"], study.base["max_steps"] // \
                study.base["eval_every"] + 1
            # a pack's validation pass: every member's rows (members x examples)
            seconds = groups * packs * (
                steps * m["step_s"]
                + passes * sizes[1] * m["validation_s_per_example"]
                + sizes[0] * m["test_s_per_example"])
            total += seconds
            rows.append({**m, "projected_s": seconds, "cells": cells * groups,
                         "mfu": m["train_flops_per_s"] / bf16_peak})
            print(f"{task:7s} {method:7s} pack {m['members']:3d}: step {m['step_s'] * 1e3:7.1f} "
                  f"ms, val {m['validation_s_per_example'] * 1e3:6.2f} ms/ex, test "
                  f"{m['test_s_per_example'] * 1e3:6.2f} ms/ex, MFU {rows[-1]['mfu']:.1%}; "
                  f"{cells * groups} cells: {seconds / 60:6.1f} min", flush=True)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"seed-study projected: {total / 60:.1f} min on {where} (goal <= 60 min, moonshot "
          f"15 min); bf16 peak {bf16_peak / 1e12:.1f} TFLOP/s measured", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "projection.json").write_text(json.dumps(
        {"rows": rows, "total_s": total, "bf16_peak_flops_per_s": bf16_peak}, indent=1))


if __name__ == "__main__":
    main()
