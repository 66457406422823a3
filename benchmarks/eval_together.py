"""A pack's validation pass with its members evaluated together (a GPU's default) against
member by member (a CPU's), on the Flan-T5-small geometry: seconds of each, and whether each
member's predictions agree.

    python benchmarks/eval_together.py --device cuda --members 8 --examples 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import peftlab.device
from peftlab.config import resolve_run_config
from peftlab.run import evaluate_pack, setup_pack

SAMSUM = dict(max_source_length=512, max_target_length=128, max_new_tokens=96)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="flan-t5-small-random")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--tasks", default="sst2,samsum")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    for task in args.tasks.split(","):
        cfgs = [resolve_run_config(dict(
            model=args.model, task=task, method="lora", seed=m, device=args.device,
            train_size=16, val_size=args.examples, test_size=8, eval_batch_size=64,
            output_dir=str(root / f"{task}-{m}"), **(SAMSUM if task == "samsum" else {})))
            for m in range(args.members)]
        setups = setup_pack(cfgs)
        device = setups[0].device
        seconds, predictions = {}, {}
        for together in (True, False, True):  # the first pass warms up
            peftlab.device.EVALUATE_TOGETHER[device.type] = together
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            results = evaluate_pack(setups, "validation", list(range(len(setups))),
                                    progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[together] = time.perf_counter() - began
            predictions[together] = [[r["prediction"] for r in x.rows] for x in results]
        same = predictions[True] == predictions[False]
        print(f"{task}: {args.members} members x {args.examples} examples: together "
              f"{seconds[True]:.2f} s, one by one {seconds[False]:.2f} s "
              f"({seconds[False] / seconds[True]:.2f}x); predictions equal: {same}", flush=True)


if __name__ == "__main__":
    main()
