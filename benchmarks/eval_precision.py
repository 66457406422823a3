"""What the evaluation's precision changes on this device: one fp32-trained SST-2 checkpoint
per method, its test split evaluated in fp32, TF32 (a GPU's fp32 with TF32 matmuls) and bf16:
predictions that agree with fp32's, accuracy, loss and seconds of each.

    python benchmarks/eval_precision.py --model flan-t5-small-random --steps 50 --out DIR

The GPU check runs it to choose a GPU's default `eval_precision` (fp32 today): a precision
that flips predictions near a tie can change the checkpoint validation selects.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftlab_bench.evaluation import measure_eval_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flan-t5-small-random")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, help="a folder for eval-precision.json")
    args = parser.parse_args()
    results = {}
    print(f"{'method':8s} {'precision':9s} {'same prediction':>15s} {'accuracy':>9s} "
          f"{'loss':>8s} {'seconds':>8s}")
    for method in args.methods.split(","):
        r = results[method] = measure_eval_precision(method, args.steps, args.model)
        for precision, metrics in r["metrics"].items():
            same = {"fp32": 1.0, "bf16": r["agreement"]}.get(precision, r.get("agreement_tf32"))
            print(f"{method:8s} {precision:9s} {same:15.1%} {metrics['accuracy']:9.2f} "
                  f"{metrics['loss']:8.4f} {r['seconds'][precision]:8.1f}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval-precision.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
