"""What every measurement shares: the model, the batch shapes, a run's setup, FLOPs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HOME = Path(__file__).resolve().parents[1]  # benchmarks/, where peftlab_bench is imported from
MODEL = "flan-t5-small-random"


MFU_BATCH_SIZES = (8, 32, 64)


SHAPES = {  # task, max source length, max target length
    "sst2": ("sst2", 128, 8),
    "samsum": ("samsum", 512, 128),
}


def setup(method: str, shape: str, batch_size: int, n_examples: int, dropout: bool = True,
           model: str = MODEL, pack: bool = True, **overrides: Any):
    import torch

    from peftlab.config import resolve_run_config
    from peftlab.data import tokenize
    from peftlab.run import setup

    task, src, tgt = SHAPES[shape]
    cfg = resolve_run_config({
        "model": model, "task": task, "method": method, "train_size": n_examples,
        "val_size": 200, "test_size": "all", "batch_size": batch_size, "seed": 0,
        "max_source_length": src, "max_target_length": tgt, "output_dir": tempfile.mkdtemp(),
        **overrides,
    })
    s = setup(cfg, pack=pack)  # the reference trains the method's own (peft) modules
    if not dropout:  # the numerics check: both pipelines must draw the same (no) masks
        for module in s.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "dropout", None), float):  # T5 attention-prob dropout
                module.dropout = 0.0
    features = tokenize(s.tokenizer, s.splits.train, src, tgt)
    torch.manual_seed(0)
    return cfg, s, features


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def peak_memory():
    """This measurement's own peak memory (see peftlab.memory), from here on."""
    import torch

    from peftlab.memory import PeakMemory

    return PeakMemory(torch.device("cuda" if torch.cuda.is_available() else "cpu")).start()


CELL = {"max_steps": 200, "eval_every": 50, "val_size": 200, "test_size": "all"}


def subprocess_measure(kind: str, **kwargs: Any) -> dict[str, Any]:
    """Run one measurement in a fresh Python process; return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "peftlab_bench.worker", kind, json.dumps(kwargs),
               f.name]
        path = os.pathsep.join(p for p in (str(HOME), os.environ.get("PYTHONPATH")) if p)
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": path})
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
        return json.loads(Path(f.name).read_text())
