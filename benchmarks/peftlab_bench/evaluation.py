"""Evaluation measurements: rank classification and generation, and what the
evaluation's precision changes."""

from __future__ import annotations

import tempfile
import time
from typing import Any

from peftlab_bench.common import MODEL, SHAPES, setup, sync


def measure_eval(shape: str, n: int, batch_size: int, bf16: bool | None = None,
                 model: str = MODEL) -> dict[str, Any]:
    """Our evaluation alone; `bf16` None: the run default for validation evaluations."""
    from peftlab.data import tokenize
    from peftlab.evaluate import generate, inference_model, rank_classify

    _, s, _ = setup("untuned", shape, batch_size, 16, model=model)
    examples = s.splits.test[:n]
    task, src, tgt = SHAPES[shape]
    feats = tokenize(s.tokenizer, examples, src, tgt)
    settings = s.eval_settings("validation", progress=False)
    settings.batch_size = batch_size
    if bf16 is not None:
        settings.bf16 = bf16
    evaluated = inference_model(s.model, settings.bf16)
    out: dict[str, Any] = {"examples": len(examples), "max_new_tokens": settings.max_new_tokens,
                           "bf16": settings.bf16}
    if shape == "sst2":
        candidates = [s.tokenizer(w)["input_ids"] for w in s.task.label_words]
        warm = tokenize(s.tokenizer, examples[:batch_size], src, tgt)
        rank_classify(evaluated, warm, candidates, settings)  # warm-up: first-call allocations
        for key, tokenizer in (("rank", None), ("rank_and_generate", s.tokenizer)):
            sync(s.device)
            t = time.perf_counter()
            rank_classify(evaluated, feats, candidates, settings, generate_with=tokenizer)
            sync(s.device)
            out[f"{key}_examples_per_s"] = len(examples) / (time.perf_counter() - t)
    t = time.perf_counter()
    generate(evaluated, s.tokenizer, feats, settings)
    out["generate_examples_per_s"] = len(examples) / (time.perf_counter() - t)
    return out


def measure_eval_precision(method: str, steps: int, model: str = MODEL) -> dict[str, Any]:
    """Does a faster evaluation hold the metric? A short fp32-trained SST-2 run (near chance
    on a random-init model: small margins, the hardest case for rounding), its final
    checkpoint evaluated on the test split in fp32, in TF32 (fp32 with TF32 matmuls: on a
    GPU only) and in bf16: predictions that agree with fp32's, accuracy, loss, time."""
    import torch

    from peftlab.config import resolve_run_config
    from peftlab.evaluate import evaluate_model
    from peftlab.run import restore, run

    cfg = resolve_run_config({
        "model": model, "task": "sst2", "method": method, "train_size": 1000, "val_size": 200,
        "test_size": "all", "seed": 0, "max_steps": steps, "eval_every": steps,
        "selection_metric": "loss",  # the trained checkpoint, not the random step 0
        "precision": "fp32", "eval_precision": "fp32", "output_dir": tempfile.mkdtemp(),
    })
    summary = run(cfg, progress=False)
    s = restore(cfg.output_dir)
    features = s.features("test")
    results, seconds = {}, {}
    precisions = ("fp32", "tf32", "bf16") if s.device.type == "cuda" else ("fp32", "bf16")
    for precision in precisions:
        settings = s.eval_settings("test", progress=False)
        settings.bf16 = precision == "bf16"
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        try:
            t = time.perf_counter()
            results[precision] = evaluate_model(s.model, s.tokenizer, s.task, s.splits.test,
                                                features, settings)
            seconds[precision] = time.perf_counter() - t
        finally:
            torch.set_float32_matmul_precision(before)
    reference = results["fp32"].rows

    def agreement(precision: str) -> float:
        rows = results[precision].rows
        return sum(x["prediction"] == y["prediction"] for x, y in zip(reference, rows)) \
            / len(rows)

    return {"examples": len(reference), "steps": steps, "best_step": summary["best_step"],
            "device": s.device.type, "seconds": seconds,
            "metrics": {p: r.metrics for p, r in results.items()},
            "agreement": agreement("bf16"),
            **({"agreement_tf32": agreement("tf32")} if "tf32" in results else {})}
