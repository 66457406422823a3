"""`peftlab bench`: speed measured side by side with the pipeline users would otherwise write.

Each measurement runs in its own subprocess, so that peak memory is that measurement's own
(process peak RSS on CPU, `max_memory_allocated` on GPU) and no cache from another
measurement helps it. The model is `flan-t5-small-random` (the real geometry: speed does not
depend on weight values); batches come from the real SST-2 and SAMSum data.

Sections:
  matmul     the machine's measured matmul peak (fp32 and bf16), the denominator of MFU
  train      training throughput per method and batch shape: peftlab's loop vs the reference
             (Seq2SeqTrainer + peft + DataCollatorForSeq2Seq), model FLOPs utilisation
  numerics   the same batches in the same order: per-step fp32 loss, peftlab vs reference
  eval       SST-2 accuracy by rank classification vs by generation; SAMSum generation
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "flan-t5-small-random"
SHAPES = {  # task, max source length, max target length
    "sst2": ("sst2", 128, 8),
    "samsum": ("samsum", 512, 128),
}


# --- what one subprocess measures ----------------------------------------------------------

def _setup(method: str, shape: str, batch_size: int, n_examples: int, dropout: bool = True):
    import torch

    from peftlab.config import resolve_run_config
    from peftlab.data import tokenize
    from peftlab.run import setup

    task, src, tgt = SHAPES[shape]
    cfg = resolve_run_config({
        "model": MODEL, "task": task, "method": method, "train_size": n_examples,
        "val_size": 200, "test_size": "all", "batch_size": batch_size, "seed": 0,
        "max_source_length": src, "max_target_length": tgt, "output_dir": tempfile.mkdtemp(),
    })
    s = setup(cfg)
    if not dropout:  # the numerics check: both pipelines must draw the same (no) masks
        for module in s.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "dropout", None), float):  # T5 attention-prob dropout
                module.dropout = 0.0
    features = tokenize(s.tokenizer, s.splits.train, src, tgt)
    torch.manual_seed(0)
    return cfg, s, features


def _peak_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_flops(cfg_model, enc_lens: list[int], dec_lens: list[int], full: bool) -> float:
    """Training FLOPs of one batch, counted from the real (non-padding) lengths.

    Forward multiply-adds per token: encoder layer 4*D*I (q, k, v, o) + 3*D*F (gated FFN)
    + 2*L_enc*I (scores and values); decoder layer the same with self-attention over the
    decoder prefix, plus cross-attention (q, o on decoder tokens, k, v on encoder tokens,
    2*L_enc*I for scores and values); the LM head D*V per decoder token. A training step is
    3x the forward for full fine-tuning (weight and activation gradients), 2x when the base
    weights are frozen (activation gradients only).
    """
    c = cfg_model
    D, inner, F, V = c.d_model, c.num_heads * c.d_kv, c.d_ff, c.vocab_size
    macs = 0.0
    for le, ld in zip(enc_lens, dec_lens):
        macs += c.num_layers * le * (4 * D * inner + 3 * D * F + 2 * le * inner)
        macs += c.num_decoder_layers * (
            ld * (4 * D * inner + 3 * D * F + ld * inner)  # causal: about half of L_dec
            + ld * (2 * D * inner + 2 * le * inner) + le * 2 * D * inner
        )
        macs += ld * D * V
    return 2 * macs * (3 if full else 2)


def measure_ours(method: str, shape: str, batch_size: int, steps: int, warmup: int,
                 precision: str) -> dict[str, Any]:
    from peftlab.data import training_batches
    from peftlab.models import load_model
    from peftlab.train import train

    cfg, s, features = _setup(method, shape, batch_size, 256)
    cfg = cfg.model_copy(update={"max_steps": warmup + steps, "log_every": warmup,
                                 "eval_every": 10**9, "warmup_ratio": 0.0,
                                 "precision": precision})
    bf16 = precision == "bf16"
    rows: list[dict] = []
    metric = s.task.primary_metric
    train(s.model, s.method, cfg, features, lambda: {metric: 0.0, "loss": 0.0}, rows.append,
          (metric, True), s.device, bf16, s.tokenizer.pad_token_id, progress=False)
    timed = next(r for r in rows if r["step"] == warmup + steps)
    seconds = timed["elapsed_s"] - next(r for r in rows if r["step"] == warmup)["elapsed_s"]
    # the same batches again, to count their real tokens
    batches = training_batches(features, cfg.batch_size, cfg.seed, s.tokenizer.pad_token_id)
    enc, dec, examples = [], [], 0
    for i, b in enumerate(batches):
        if i >= warmup + steps:
            break
        if i >= warmup:
            enc += b["attention_mask"].sum(1).tolist()
            dec += (b["labels"] != -100).sum(1).tolist()
            examples += len(b["input_ids"])
    flops = model_flops(load_model(MODEL).config, enc, dec, full=method == "full")
    return {"seconds": seconds, "examples_per_s": examples / seconds,
            "tokens_per_s": (sum(enc) + sum(dec)) / seconds, "flops_per_s": flops / seconds,
            "peak_memory_mb": _peak_mb(s.device), "device": str(s.device)}


def measure_reference(method: str, shape: str, batch_size: int, steps: int, warmup: int,
                      precision: str, sequential: bool = False,
                      order: list[int] | None = None, n_examples: int = 256,
                      dropout: bool = True) -> dict[str, Any]:
    """What the HF docs show: Seq2SeqTrainer + peft + DataCollatorForSeq2Seq."""
    import datasets
    from transformers import (
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
    )

    cfg, s, features = _setup(method, shape, batch_size, n_examples, dropout)
    idx = order if order is not None else list(range(len(features)))
    data = datasets.Dataset.from_dict({"input_ids": [features.input_ids[i] for i in idx],
                                       "labels": [features.labels[i] for i in idx]})
    marks: dict[int, float] = {}
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            marks[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = Seq2SeqTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size,
        max_steps=warmup + steps, learning_rate=cfg.learning_rate, warmup_steps=0,
        lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=s.device.type == "cpu", bf16=precision == "bf16", seed=0,
        train_sampling_strategy="sequential" if sequential else "random",
        dataloader_num_workers=0,
    )
    collator = DataCollatorForSeq2Seq(s.tokenizer, model=s.model, padding=True,
                                      label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=s.model, args=args, train_dataset=data,
                             data_collator=collator, callbacks=[Clock()])
    trainer.train()
    seconds = marks[warmup + steps] - marks[warmup]
    examples = steps * batch_size
    return {"seconds": seconds, "examples_per_s": examples / seconds, "losses": losses,
            "peak_memory_mb": _peak_mb(s.device)}


def measure_numerics(method: str, steps: int) -> dict[str, Any]:
    """Same batches, same order, fp32: per-step losses of both pipelines."""
    import numpy as np

    from peftlab.data import length_grouped_batches

    cfg, s, features = _setup(method, "sst2", 8, 64, dropout=False)
    lengths = [len(a) + len(b) for a, b in zip(features.input_ids, features.labels)]
    order = [i for b in length_grouped_batches(lengths, 8, np.random.default_rng([0, 0]))
             for i in b]  # peftlab's first epoch, flattened: 8 full batches of 8
    ours = subprocess_measure("ours-losses", method=method, steps=steps)
    ref = subprocess_measure("reference", method=method, shape="sst2", batch_size=8, steps=steps,
                             warmup=0, precision="fp32", sequential=True, order=order,
                             n_examples=64, dropout=False)
    diffs = [abs(a - b) for a, b in zip(ours["losses"], ref["losses"])]
    return {"ours": ours["losses"], "reference": ref["losses"], "max_abs_diff": max(diffs)}


def measure_ours_losses(method: str, steps: int) -> dict[str, Any]:
    from peftlab.train import train

    cfg, s, features = _setup(method, "sst2", 8, 64, dropout=False)
    cfg = cfg.model_copy(update={"max_steps": steps, "log_every": 1, "eval_every": 10**9,
                                 "warmup_ratio": 0.0, "precision": "fp32"})
    rows: list[dict] = []
    metric = s.task.primary_metric
    train(s.model, s.method, cfg, features, lambda: {metric: 0.0, "loss": 0.0}, rows.append,
          (metric, True), s.device, False, s.tokenizer.pad_token_id, progress=False)
    return {"losses": [r["train_loss"] for r in rows if r["step"] > 0]}


def measure_eval(shape: str, n: int, batch_size: int) -> dict[str, Any]:
    from peftlab.evaluate import generate, rank_classify

    cfg, s, _ = _setup("untuned", shape, batch_size, 16)
    examples = s.splits.test[:n]
    from peftlab.data import tokenize

    task, src, tgt = SHAPES[shape]
    feats = tokenize(s.tokenizer, examples, src, tgt)
    settings = s.eval_settings("test", progress=False)
    settings.batch_size = batch_size
    settings.max_new_tokens = 8 if shape == "sst2" else 64
    out: dict[str, Any] = {"examples": len(examples)}
    if shape == "sst2":
        candidates = [s.tokenizer(w)["input_ids"] for w in s.task.label_words]
        t = time.perf_counter()
        rank_classify(s.model, feats, candidates, settings)
        out["rank_examples_per_s"] = len(examples) / (time.perf_counter() - t)
    t = time.perf_counter()
    generate(s.model, s.tokenizer, feats, settings)
    out["generate_examples_per_s"] = len(examples) / (time.perf_counter() - t)
    return out


def measure_matmul(size: int = 2048, repeats: int = 10) -> dict[str, float]:
    import torch

    out = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        out[f"{name}_flops_per_s"] = 2 * size**3 * repeats / (time.perf_counter() - t)
    return out


WORKERS = {"ours": measure_ours, "reference": measure_reference, "eval": measure_eval,
           "matmul": measure_matmul, "ours-losses": measure_ours_losses}


def subprocess_measure(kind: str, **kwargs: Any) -> dict[str, Any]:
    """Run one measurement in a fresh Python process; return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "peftlab.bench", kind, json.dumps(kwargs), f.name]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
        return json.loads(Path(f.name).read_text())


# --- the benchmark -------------------------------------------------------------------------

def run_benchmark(out_dir: Path, methods: list[str], shapes: list[str], steps: int,
                  warmup: int, precision: str, sections: list[str],
                  log: Any = print) -> dict[str, Any]:
    import torch

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "model": MODEL, "precision": precision,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
                   + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "torch": torch.__version__, "steps": steps, "warmup": warmup,
    }
    if "matmul" in sections or "train" in sections:
        results["matmul"] = subprocess_measure("matmul")
        log(f"matmul peak: {json.dumps(results['matmul'])}")
    if "train" in sections:
        results["train"] = {}
        peak = results["matmul"][f"{precision}_flops_per_s"]
        for shape in shapes:
            batch = 8
            for method in methods:
                ours = subprocess_measure("ours", method=method, shape=shape, batch_size=batch,
                                          steps=steps, warmup=warmup, precision=precision)
                ref = subprocess_measure("reference", method=method, shape=shape,
                                         batch_size=batch, steps=steps, warmup=warmup,
                                         precision=precision)
                row = {"ours": ours, "reference": ref}
                if "error" not in ours and "error" not in ref:
                    row["speedup"] = ours["examples_per_s"] / ref["examples_per_s"]
                    row["mfu"] = ours["flops_per_s"] / peak
                results["train"][f"{shape}/{method}"] = row
                log(f"train {shape}/{method}: {json.dumps(_short(row))}")
                _save(out_dir, results)
    if "numerics" in sections:
        results["numerics"] = {m: measure_numerics(m, 8) for m in ("lora", "full")}
        log(f"numerics: {json.dumps({m: r['max_abs_diff'] for m, r in results['numerics'].items()})}")
    if "eval" in sections:
        results["eval"] = {
            "sst2": subprocess_measure("eval", shape="sst2", n=872, batch_size=64),
            "samsum": subprocess_measure("eval", shape="samsum", n=64, batch_size=32),
        }
        sst2 = results["eval"]["sst2"]
        if "rank_examples_per_s" in sst2:
            sst2["rank_speedup"] = sst2["rank_examples_per_s"] / sst2["generate_examples_per_s"]
        log(f"eval: {json.dumps(results['eval'])}")
    _save(out_dir, results)
    return results


def _short(row: dict) -> dict:
    out = {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}
    for side in ("ours", "reference"):
        r = row[side]
        out[side] = r.get("error") or {"ex/s": round(r["examples_per_s"], 2),
                                       "MB": round(r["peak_memory_mb"])}
    return out


def _save(out_dir: Path, results: dict) -> None:
    from peftlab.files import atomic_write_text, write_json

    write_json(out_dir / "bench.json", results)
    atomic_write_text(out_dir / "bench.md", markdown(results))


def markdown(r: dict) -> str:
    lines = [f"# peftlab benchmark ({r['date']}, {r['machine']}, torch {r['torch']}, "
             f"{r['model']}, {r['precision']})", ""]
    if "matmul" in r:
        m = r["matmul"]
        lines += [f"Measured matmul peak (2048x2048): fp32 {m['fp32_flops_per_s'] / 1e9:.0f} "
                  f"GFLOP/s, bf16 {m['bf16_flops_per_s'] / 1e9:.0f} GFLOP/s.", ""]
    if "train" in r:
        lines += [f"Training, batch 8, {r['steps']} timed steps after {r['warmup']} warm-up:", "",
                  "| shape/method | peftlab ex/s | reference ex/s | speedup | peftlab tok/s | "
                  "MFU | peftlab peak MB | reference peak MB |", "|---|---|---|---|---|---|---|---|"]
        for key, row in r["train"].items():
            o, f = row["ours"], row["reference"]
            if "error" in o or "error" in f:
                lines.append(f"| {key} | {o.get('error', '')} | {f.get('error', '')} | | | | | |")
                continue
            lines.append(f"| {key} | {o['examples_per_s']:.2f} | {f['examples_per_s']:.2f} | "
                         f"{row['speedup']:.2f}x | {o['tokens_per_s']:.0f} | {100 * row['mfu']:.1f}% "
                         f"| {o['peak_memory_mb']:.0f} | {f['peak_memory_mb']:.0f} |")
        lines.append("")
    if "numerics" in r:
        lines += ["Same batches, same order, fp32 (8 steps): max |loss difference| "
                  + ", ".join(f"{m} {v['max_abs_diff']:.2e}" for m, v in r["numerics"].items()), ""]
    if "eval" in r:
        e = r["eval"]
        lines += [f"SST-2 test ({e['sst2'].get('examples')} examples): rank classification "
                  f"{e['sst2'].get('rank_examples_per_s', 0):.1f} ex/s vs generation "
                  f"{e['sst2'].get('generate_examples_per_s', 0):.1f} ex/s "
                  f"({e['sst2'].get('rank_speedup', 0):.1f}x). SAMSum greedy generation, "
                  f"length-sorted batches of 32, up to 64 new tokens: "
                  f"{e['samsum'].get('generate_examples_per_s', 0):.2f} ex/s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # a measurement subprocess: kind, JSON kwargs, output file
    kind, kwargs, out_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    Path(out_file).write_text(json.dumps(WORKERS[kind](**kwargs)))
