"""How far a packed run drifts from the same run alone over a long run: members of one pack
(3 learning rates x seeds) and the same runs one by one, on the Flan-T5-small geometry with
the seed-study's settings (SST-2, 600 steps, evaluation every 100 on 200 examples).

    PEFTLAB_DATA_DIR=../shared/data .venv/bin/python benchmarks/pack_tolerance.py \\
        --method lora --steps 600 --out /tmp/tolerance

Prints, per member, the largest relative difference of the training loss over the logged
steps (and at the last one), of the validation loss, the selected step and the test accuracy
of both, and whether the rate the report would choose (best mean validation over seeds) is
the same. Packed and alone differ only in floating-point rounding: a pack's rows go through
in chunks whose composition differs from a run alone's batches, so the matrix products sum
in another order.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from peftlab.config import resolve_run_config
from peftlab.files import read_jsonl
from peftlab.records import read_json
from peftlab.run import run, run_pack

RATES = {"lora": (3e-4, 1e-3, 3e-3), "prefix": (1e-3, 5e-3, 2e-2), "prompt": (3e-2, 0.3, 1.0)}


def configs(out: Path, method: str, steps: int, seeds: list[int], model: str) -> list:
    return [resolve_run_config(dict(
        model=model, task="sst2", method=method, train_size=256, val_size=200, test_size="all",
        max_steps=steps, eval_every=max(steps // 6, 1), log_every=20, batch_size=8,
        eval_batch_size=64, warmup_ratio=0.06, seed=seed, learning_rate=lr, cpu_threads=1,
        output_dir=str(out / f"lr{lr:g}-seed{seed}"))) for lr in RATES[method] for seed in seeds]


def alone(cfg) -> None:
    run(cfg, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", choices=sorted(RATES))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--model", default="flan-t5-small-random")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    packed = configs(args.out / "packed", args.method, args.steps, seeds, args.model)
    single = configs(args.out / "alone", args.method, args.steps, seeds, args.model)
    with ProcessPoolExecutor(2) as pool:  # the pack in one process, the runs alone in another
        job = pool.submit(run_pack, packed, False)
        list(pool.map(alone, single))
        job.result()
    rows, choice = [], {}
    for p, a in zip(packed, single):
        mp, ma = read_jsonl(Path(p.output_dir) / "metrics.jsonl"), \
            read_jsonl(Path(a.output_dir) / "metrics.jsonl")
        rel = [abs(x["train_loss"] - y["train_loss"]) / abs(y["train_loss"])
               for x, y in zip(mp, ma) if x.get("train_loss") is not None]
        val = [abs(x["val_loss"] - y["val_loss"]) / abs(y["val_loss"])
               for x, y in zip(mp, ma) if x.get("val_loss") is not None]
        sp, sa = read_json(Path(p.output_dir) / "summary.json"), \
            read_json(Path(a.output_dir) / "summary.json")
        rows.append({"run": Path(p.output_dir).name, "train_loss_max_rel": max(rel),
                     "train_loss_last_rel": rel[-1], "val_loss_max_rel": max(val),
                     "best_step": (sp["best_step"], sa["best_step"]),
                     "test_accuracy": (sp["test_metrics"]["accuracy"],
                                       sa["test_metrics"]["accuracy"]),
                     "val_accuracy": (sp["val_metrics"]["accuracy"],
                                      sa["val_metrics"]["accuracy"])})
        for side, s in (("packed", sp), ("alone", sa)):
            choice.setdefault(side, {}).setdefault(p.learning_rate, []).append(
                s["val_metrics"]["accuracy"])
        print(f"{rows[-1]['run']}: train loss max rel diff {max(rel):.2e} (last {rel[-1]:.2e}), "
              f"val loss {max(val):.2e}; best step {sp['best_step']} vs {sa['best_step']}; "
              f"test accuracy {sp['test_metrics']['accuracy']:.2f} vs "
              f"{sa['test_metrics']['accuracy']:.2f}", flush=True)
    chosen = {side: max(rates, key=lambda r: sum(rates[r]) / len(rates[r]))
              for side, rates in choice.items()}
    print(f"rate chosen on validation: packed {chosen['packed']:g}, alone {chosen['alone']:g}")
    (args.out / "tolerance.json").write_text(json.dumps({"rows": rows, "chosen": chosen},
                                                        indent=1))


if __name__ == "__main__":
    main()
