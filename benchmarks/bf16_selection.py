"""What bf16 validation changes in a study's selections: the same study run twice, with every
validation in fp32 (the default) and with `eval_precision: bf16-validation`.

    PEFTLAB_DATA_DIR=../shared/data .venv/bin/python benchmarks/bf16_selection.py \
        --preset smoke --out /tmp/bf16-selection

Training is fp32 in both, so the weights at every step are the same; only what validation
measures, and so what it selects, can differ: each run's selected checkpoint (best step),
each method's learning rate and size, and the test score that the report then shows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from peftlab.report.load import expand_shared, load_runs, select_learning_rates
from peftlab.report.select import best_configs
from peftlab.study import load_study


def run_variant(preset: str, out: Path, precision: str) -> Path:
    study = load_study(preset=preset).model_dump()
    study["base"]["eval_precision"] = precision
    folder = out / precision
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input.yaml").write_text(yaml.safe_dump(study, sort_keys=False))  # knob order
    subprocess.run([str(Path(sys.executable).parent / "peftlab"), "run", str(folder / "input.yaml"),
                    "--out", str(folder / "study"), "--quiet", "--no-report"], check=True)
    return folder / "study"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs, best = {}, {}
    for precision in ("fp32", "bf16-validation"):
        folder = run_variant(args.preset, args.out, precision)
        table = select_learning_rates(load_runs(folder)[0], "grid")
        runs[precision] = table.set_index("key")
        best[precision] = best_configs(expand_shared(table), "grid").set_index(
            ["task", "train_size", "method_name"])
    a, b = runs["fp32"], runs["bf16-validation"]
    trained = a.learning_rate.notna()
    steps = (a.best_step[trained] != b.best_step[trained]).sum()
    print(f"runs: {trained.sum()} trained; selected checkpoint differs in {steps} "
          f"({100 * steps / trained.sum():.0f}%)")
    lr = a.selected[trained] != b.selected[trained]
    groups = a[trained].groupby(["task", "label", "train_size"]).ngroups
    changed = a[trained][lr].groupby(["task", "label", "train_size"]).ngroups
    print(f"learning rate chosen: differs in {changed} of {groups} (task, method+size, n)")
    x, y = best["fp32"], best["bf16-validation"]
    size = (x.label != y.label).sum()
    print(f"size chosen per method: differs in {size} of {len(x)} (task, n, method)")
    delta = (y.test_mean - x.test_mean).abs()
    print(f"reported test score of each method's selection: |difference| mean "
          f"{delta.mean():.2f}, max {delta.max():.2f} points; differs in {(delta > 0).sum()} "
          f"of {len(x)}")
    pd.set_option("display.width", 160)
    print(pd.DataFrame({"fp32": x.label + " " + x.test_mean.round(1).astype(str),
                        "bf16-validation": y.label + " " + y.test_mean.round(1).astype(str)}))


if __name__ == "__main__":
    main()
