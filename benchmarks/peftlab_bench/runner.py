"""The benchmark: each measurement in its own subprocess, the sections in order,
`bench.json` and `bench.md` written as they complete."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab_bench.common import MFU_BATCH_SIZES, MODEL, subprocess_measure
from peftlab_bench.markdown import markdown
from peftlab_bench.training import measure_numerics

SECTIONS = ("matmul", "train", "mfu", "numerics", "bf16", "bf16_eval", "batching", "eval",
            "cell", "grid", "pack")




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


