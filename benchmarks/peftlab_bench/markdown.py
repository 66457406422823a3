"""`bench.md`: the results as Markdown tables."""

from __future__ import annotations

from typing import Any


def _f(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "–"


def markdown(r: dict) -> str:
    lines = [f"# peftlab benchmark ({r['date']}, {r['machine']}, torch {r['torch']}, "
             f"{r['model']}, {r['precision']})", ""]
    if "matmul" in r and "error" not in r["matmul"]:
        m = r["matmul"]
        scale, unit = (1e12, "TFLOP/s") if m["fp32_flops_per_s"] > 5e12 else (1e9, "GFLOP/s")
        lines += [f"Measured matmul peak ({m.get('size', 2048)}x{m.get('size', 2048)}): fp32 "
                  f"{m['fp32_flops_per_s'] / scale:.0f} {unit}, bf16 "
                  f"{m['bf16_flops_per_s'] / scale:.0f} {unit}. MFU is against the peak of "
                  "the precision used, measured in the same process right after the timed "
                  "steps.", ""]
    if "train" in r:
        columns = ["shape/method", "peftlab ex/s", "reference ex/s", "speedup", "peftlab tok/s",
                   "MFU", "peftlab peak MB", "reference peak MB"]
        lines += _table(f"## Training throughput, batch 8, {r['steps']} timed steps after "
                        f"{r['warmup']} warm-up", columns)
        for key, row in r["train"].items():
            o, f = row["ours"], row["reference"]
            if "error" in o or "error" in f:
                lines.append(_row([key, o.get("error", ""), f.get("error", "")], len(columns)))
                continue
            mfu = 100 * row["mfu"] if row.get("mfu") is not None else None
            mfu_fmt = ".1f" if mfu is None or mfu >= 1 else ".2g"  # a GPU's are tiny
            lines.append(_row([key, f"{o['examples_per_s']:.2f}", f"{f['examples_per_s']:.2f}",
                               _speedup(row), f"{o['tokens_per_s']:.0f}",
                               f"{_f(mfu, mfu_fmt)}%", f"{o['peak_memory_mb']:.0f}",
                               f"{f['peak_memory_mb']:.0f}"], len(columns)))
        lines.append("")
    if "mfu" in r:
        columns = ["precision", "batch", "examples/s", "model FLOP/s", "matmul peak", "MFU"]
        lines += _table(f"## Full fine-tuning's MFU by batch size (SST-2 shapes, {r['steps']} "
                        f"timed steps after {r['warmup']} warm-up)", columns)
        for key, o in r["mfu"].items():
            precision, batch = key.split("/")
            if "error" in o:
                lines.append(_row([precision, batch, f"error: {o['error']}"], len(columns)))
                continue
            scale, unit = (1e12, "T") if o["peak_flops_per_s"] > 5e12 else (1e9, "G")
            lines.append(_row([precision, batch, f"{o['examples_per_s']:.2f}",
                               f"{o['flops_per_s'] / scale:.1f} {unit}",
                               f"{o['peak_flops_per_s'] / scale:.0f} {unit}",
                               f"{_f(100 * o['mfu'], '.1f')}%"], len(columns)))
        lines.append("")
    if "numerics" in r:
        lines += ["## Numerics", "", "Same batches, same order, fp32 (8 steps): max |loss "
                  "difference| peftlab vs reference: " + ", ".join(
                      f"{k} {_f(v.get('max_abs_diff'), '.2e')}" for k, v in r["numerics"].items()),
                  ""]
    if "bf16" in r:
        columns = ["method", "bf16 speedup", "max abs loss diff", "mean abs loss diff",
                   "val metric fp32", "val metric bf16"]
        lines += _table(f"## bf16 autocast vs fp32 (SST-2, {r['curve_steps']} steps, same seed)",
                        columns)
        for method, c in r["bf16"].items():
            if "speedup" not in c:
                error = c["fp32"].get("error") or c["bf16"].get("error")
                lines.append(_row([method, f"error: {error}"], len(columns)))
                continue
            lines.append(_row([method, f"{c['speedup']:.2f}x", f"{c['max_abs_loss_diff']:.4f}",
                               f"{c['mean_abs_loss_diff']:.4f}", f"{c['val_metric']['fp32']:.2f}",
                               f"{c['val_metric']['bf16']:.2f}"], len(columns)))
        lines.append("")
    if "bf16_eval" in r:
        columns = ["method", "test examples", "same prediction", "accuracy fp32", "accuracy bf16",
                   "loss fp32", "loss bf16", "eval s fp32", "eval s bf16"]
        lines += _table(f"## One fp32-trained checkpoint ({r['curve_steps']} steps, SST-2) "
                        "evaluated in fp32 and in bf16", columns)
        for method, c in r["bf16_eval"].items():
            if "error" in c:
                lines.append(_row([method, f"error: {c['error']}"], len(columns)))
                continue
            a, b = c["metrics"]["fp32"], c["metrics"]["bf16"]
            lines.append(_row([method, str(c["examples"]), f"{c['agreement']:.1%}",
                               f"{a['accuracy']:.2f}", f"{b['accuracy']:.2f}", f"{a['loss']:.4f}",
                               f"{b['loss']:.4f}", f"{c['seconds']['fp32']:.1f}",
                               f"{c['seconds']['bf16']:.1f}"], len(columns)))
        lines.append("")
    if "batching" in r:
        columns = ["shape", "padding grouped", "padding random", "speedup", "val metric random",
                   "val metric grouped"]
        lines += _table("## Length-grouped vs random batches (LoRA)", columns)
        for shape, row in r["batching"].items():
            g, rn = row["grouped"], row["random"]
            c = row.get("curves", {}).get("val_metric", {})
            lines.append(_row([shape, _f(g.get("padding_fraction"), ".1%"),
                               _f(rn.get("padding_fraction"), ".1%"),
                               f"{_f(row.get('speedup'), '.2f')}x", _f(c.get("random"), ".2f"),
                               _f(c.get("grouped"), ".2f")], len(columns)))
        lines.append("")
    if "eval" in r:
        lines += ["## Evaluation", ""]
        e = r["eval"].get("sst2")
        if e and "rank_vs_reference" in e:
            o = e["ours"]
            precision = "bf16" if o.get("bf16") else "fp32"
            fp32 = e.get("ours_fp32", o)
            lines += [
                f"SST-2 test ({o['examples']} examples, batch 64), peftlab in its validation "
                f"precision here, {precision}: rank classification "
                f"{o['rank_examples_per_s']:.1f} ex/s (fp32: {fp32['rank_examples_per_s']:.1f}); "
                "rank classification plus free generation from the same encoder pass (the test "
                f"split's work) {_f(o.get('rank_and_generate_examples_per_s'), '.1f')} ex/s "
                f"(fp32: {_f(fp32.get('rank_and_generate_examples_per_s'), '.1f')}); "
                f"peftlab's own sorted generation {o['generate_examples_per_s']:.1f} ex/s "
                f"({e['rank_vs_own_generation']:.1f}x). Reference `predict_with_generate` (fp32) "
                f"{e['reference']['examples_per_s']:.1f} ex/s with its default length limit "
                f"(an untrained model never stops early): rank classification "
                f"{e['rank_vs_reference']:.1f}x faster "
                f"(fp32: {_f(e.get('rank_fp32_vs_reference'), '.1f')}x); "
                f"{e['reference_short']['examples_per_s']:.1f} ex/s when capped at the label "
                f"word's length ({e['rank_vs_reference_short']:.1f}x).", ""]
        e = r["eval"].get("samsum")
        if e and "speedup" in e:
            lines += [f"SAMSum greedy generation ({e['ours']['examples']} test examples, batch "
                      f"32, up to 96 new tokens): peftlab {e['ours']['generate_examples_per_s']:.2f}"
                      f" ex/s (length-sorted), reference {e['reference']['examples_per_s']:.2f} "
                      f"ex/s ({e['speedup']:.2f}x).", ""]
    if "cell" in r:
        columns = ["task", "peftlab s", "reference s", "speedup", "peftlab test", "reference test"]
        lines += _table("## One ablation cell end to end (LoRA, 200 steps, validation every 50 on "
                        "200 examples, full test split)", columns)
        for shape, row in r["cell"].items():
            o, f = row["ours"], row["reference"]
            if "speedup" not in row:
                lines.append(_row([shape, o.get("error", ""), f.get("error", "")], len(columns)))
                continue
            lines.append(_row([shape, f"{o['seconds']:.1f}", f"{f['seconds']:.1f}",
                               _speedup(row), _metrics(o["test_metrics"]),
                               _metrics(f["test_metrics"])], len(columns)))
        lines.append("")
        for shape, row in r["cell"].items():
            o, f = row["ours"], row["reference"]
            if "phases" in o and "phases" in f:
                lines += [f"Where the {shape} cell's seconds went (the runs above): peftlab "
                          f"{_phases(o['phases'])}; reference {_phases(f['phases'])}. Validation "
                          "includes peftlab's step-0 evaluation, which the reference does not run.",
                          ""]
    if "pack" in r:
        # `packs`: what ran, where `pack` is the limit (packs are split to fill the workers)
        columns = ["cells", "pack", "packs", "workers", "runs", "seconds", "runs/hour",
                   "vs unpacked", "MFU (training)"]
        first = next((row for rows in r["pack"].values() for row in rows.values()
                      if "settings" in row), {})
        lines += _table("## Packed training (`peftlab run --pack P`): the same runs unpacked "
                        f"and in packs ({first.get('settings', {})})", columns)
        for name, rows in r["pack"].items():
            base = rows.get("1", {}).get("runs_per_hour")
            for size, row in rows.items():
                if "error" in row:
                    lines.append(_row([name, size, f"error: {row['error']}"], len(columns)))
                    continue
                gain = f"{row['runs_per_hour'] / base:.2f}x" if base else "–"
                lines.append(_row([name, size, str(row.get("packs", "")),
                                   str(row.get("workers", "")), str(row["runs"]),
                                   _f(row["seconds"], ".1f"), _f(row["runs_per_hour"], ".0f"),
                                   gain, _f(row.get("mfu"), ".2%")], len(columns)))
        lines.append("")
    if "grid" in r:
        columns = ["N", "runs", "steps per run", "seconds", "runs/hour"]
        title = ("## Grid throughput on one GPU (`--runs-per-gpu N`, SST-2 LoRA cells)"
                 if all(row.get("device", "cuda") == "cuda" for row in r["grid"].values()) else
                 "## Grid throughput on this CPU (`peftlab run STUDY --workers N`: N runs at once, "
                 "the CPUs split between them; SST-2 LoRA cells)")
        lines += _table(title, columns)
        for n, row in sorted(r["grid"].items(), key=lambda kv: int(kv[0])):
            cells = ([n, f"error: {row['error']}"] if "error" in row else
                     [n, str(row.get("runs", "")), str(row.get("max_steps", "")),
                      _f(row.get("seconds"), ".1f"), _f(row.get("runs_per_hour"), ".0f")])
            lines.append(_row(cells, len(columns)))
        lines.append("")
    return "\n".join(lines)


def _speedup(row: dict) -> str:
    """The median ratio; with several back-to-back pairs, their range and count."""
    ratios = row.get("speedups", [row["speedup"]])
    if len(ratios) == 1:
        return f"{row['speedup']:.2f}x"
    return f"{row['speedup']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x, {len(ratios)} pairs)"


def _phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())


def _table(title: str, columns: list[str]) -> list[str]:
    return [title, "", _row(columns, len(columns)), "|" + "---|" * len(columns)]


def _row(cells: list[str], width: int) -> str:
    """A Markdown table row; cells missing at the end are left empty."""
    return "| " + " | ".join(cells) + " |" + " |" * (width - len(cells))


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{k.removeprefix('test_')} {v:.3f}" for k, v in metrics.items()
                     if isinstance(v, float) and not k.endswith(("runtime", "per_second", "loss")))
