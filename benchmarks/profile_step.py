"""Where one training step's time goes: forward, backward, gradient clipping, optimizer.

    PEFTLAB_DATA_DIR=../shared/data .venv/bin/python benchmarks/profile_step.py \
        --method full --shape sst2 --steps 12 [--denormals] [--optimizer plain] [--bf16] [--ops]

--denormals keeps x86 denormal arithmetic (peftlab flushes them to zero in every thread);
--optimizer plain is torch's per-tensor AdamW (peftlab uses the fused one); --ops prints the
torch profiler's operator table for one step.
"""

from __future__ import annotations

import argparse
import time

import torch

from peftlab.data import training_batches
from peftlab.denormals import set_flush_denormal
from peftlab_bench.common import setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="full")
    ap.add_argument("--shape", default="sst2", choices=["sst2", "samsum"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--model", default="flan-t5-small-random")
    ap.add_argument("--denormals", action="store_true")
    ap.add_argument("--optimizer", default="fused", choices=["fused", "plain"])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--ops", action="store_true")
    a = ap.parse_args()

    cfg, s, features = setup(a.method, a.shape, 8, 256, model=a.model)
    set_flush_denormal(not a.denormals)  # every compute thread, as the training loop does
    model = s.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, fused=a.optimizer == "fused" or None)
    batches = training_batches(features, 8, 0, s.tokenizer.pad_token_id)
    totals = [0.0] * 4
    for step in range(1, a.steps + 1):
        batch = next(batches)
        marks = [time.perf_counter()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = model(**batch).loss
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        marks.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        phases = [b - a for a, b in zip(marks, marks[1:])]
        if step > 2:  # the first steps allocate optimizer state
            totals = [t + p for t, p in zip(totals, phases)]
        print(f"step {step:3d} {tuple(batch['input_ids'].shape)}  forward {phases[0]:.3f}  "
              f"backward {phases[1]:.3f}  clip {phases[2]:.3f}  optimizer {phases[3]:.3f}  "
              f"total {sum(phases):.3f} s")
    n = max(1, a.steps - 2)
    print("mean after 2 steps: " + "  ".join(
        f"{name} {t / n:.3f}" for name, t in zip(("forward", "backward", "clip", "optimizer"),
                                                 totals)) + f"  total {sum(totals) / n:.3f} s")
    if a.ops:
        from torch.profiler import ProfilerActivity, profile

        batch = next(batches)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                model(**batch).loss.backward()
            opt.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
