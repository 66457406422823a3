"""Correctness of the packed paths on a device: (1) a pack of 3 members of LoRA, prompt and
prefix tuning (fp32) writes what each member's run alone writes; (2) bf16 training with
bf16 validation completes for every packable method, packed.

    python benchmarks/gpu_correctness.py --device cuda --out OUT

Prints one line per check (PASS/FAIL and the largest relative difference of a logged loss),
writes OUT/correctness.json, and exits 1 if a check failed. `--device cpu --model t5-tiny`
runs the same checks on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from peftlab.config import resolve_run_config
from peftlab.files import read_jsonl
from peftlab.records import read_json
from peftlab.run import run, run_pack

MEMBERS = [(0, 1e-3), (1, 1e-2), (2, 3e-3)]
METHOD_ARGS = {"lora": {}, "ia3": {}, "ln": {}, "prompt": {"num_virtual_tokens": 4},
               "prefix": {"num_prefix_tokens": 4}}
RATE_SCALE = {"prompt": 30.0}
TIMING = ("elapsed_s", "examples_per_s", "eval_s")


def configs(root: Path, method: str, model: str, device: str, **extra) -> list:
    return [resolve_run_config(dict(
        model=model, task="sst2", method=method, method_args=METHOD_ARGS[method],
        train_size=16, val_size=8, test_size=16, max_steps=6, eval_every=2, log_every=1,
        batch_size=4, eval_batch_size=16, seed=seed, device=device, cpu_threads=4,
        learning_rate=lr * RATE_SCALE.get(method, 1.0), output_dir=str(root / f"m{i}"),
        **extra)) for i, (seed, lr) in enumerate(MEMBERS)]


def largest_difference(packed: Path, alone: Path) -> tuple[float, bool]:
    """The largest relative difference of a logged loss, and whether the test predictions
    and selected steps are equal."""
    worst = 0.0
    for p, a in zip(read_jsonl(packed / "metrics.jsonl"), read_jsonl(alone / "metrics.jsonl")):
        for key in p:
            if key.endswith("loss") and key not in TIMING and p[key] is not None:
                if not (math.isfinite(p[key]) and math.isfinite(a[key])):
                    return math.inf, False
                worst = max(worst, abs(p[key] - a[key]) / max(abs(a[key]), 1e-12))
    same = [r["prediction"] for r in read_jsonl(packed / "predictions" / "test.jsonl")] == \
        [r["prediction"] for r in read_jsonl(alone / "predictions" / "test.jsonl")]
    same &= read_json(packed / "summary.json")["best_step"] == \
        read_json(alone / "summary.json")["best_step"]
    return worst, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="flan-t5-small-random")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest relative loss difference accepted, packed vs alone")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    results, failed = [], False
    for method in ("lora", "prompt", "prefix"):
        packed = configs(root / f"{method}-packed", method, args.model, args.device,
                         precision="fp32")
        alone = configs(root / f"{method}-alone", method, args.model, args.device,
                        precision="fp32")
        run_pack(packed, progress=False)
        for cfg in alone:
            run(cfg, progress=False)
        diffs = [largest_difference(Path(p.output_dir), Path(a.output_dir))
                 for p, a in zip(packed, alone)]
        worst = max(d for d, _ in diffs)
        ok = worst <= args.tolerance and all(same for _, same in diffs)
        failed |= not ok
        results.append({"check": f"pack of 3 = alone, fp32: {method}", "ok": ok,
                        "largest_relative_loss_difference": worst,
                        "predictions_and_steps_equal": all(same for _, same in diffs)})
    for method in METHOD_ARGS:
        cfgs = configs(root / f"{method}-bf16", method, args.model, args.device,
                       precision="bf16", eval_precision="bf16-validation")
        try:
            statuses = [s["status"] for s in run_pack(cfgs, progress=False)]
            ok = statuses == ["completed"] * len(cfgs)
            detail = ", ".join(statuses)
        except Exception as e:  # noqa: BLE001 - the check reports any failure
            ok, detail = False, f"{type(e).__name__}: {e}"
        failed |= not ok
        results.append({"check": f"bf16 training, bf16 validation, packed: {method}",
                        "ok": ok, "detail": detail})
    for r in results:
        extra = r.get("detail") or (f"largest relative loss difference "
                                    f"{r['largest_relative_loss_difference']:.2e}, predictions "
                                    f"and steps equal: {r['predictions_and_steps_equal']}")
        print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['check']}  ({extra})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "correctness.json").write_text(json.dumps(results, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
