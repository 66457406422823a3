"""Where the SST-2 test split's evaluation time goes, by `eval_batch_size`.

    PEFTLAB_DATA_DIR=../shared/data .venv/bin/python benchmarks/eval_batch.py \
        --sizes 32,64,128 --rounds 2

The test split's work in fp32 on the Flan-T5-small geometry: one encoder pass per input
(with the decoder's start position and cross-attention keys and values), free greedy
generation continuing from it, and the label words' scores. The sizes alternate within
each round, in one process, so the host's drift falls on all of them alike.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from typing import Any

import torch

import peftlab.evaluate as evaluate
from peftlab.denormals import flushed_denormals
from peftlab_bench.common import setup

seconds: collections.Counter[str] = collections.Counter()


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - began
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32,64,128")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="flan-t5-small-random")
    a = ap.parse_args()

    _, s, _ = setup("lora", "sst2", 8, 16, model=a.model)
    features = s.features("test")
    settings = s.eval_settings("test", progress=False)
    candidates = [s.tokenizer(w)["input_ids"] for w in s.task.label_words]
    # the phases rank_classify calls, timed where they are looked up
    evaluate._encode = timed("encoder", evaluate._encode)
    evaluate._generate_ids = timed("generation", evaluate._generate_ids)
    evaluate._candidate_logprobs = timed("label scores", evaluate._candidate_logprobs)
    print(f"{len(features)} test examples, fp32: {not settings.bf16}")
    with flushed_denormals(), torch.no_grad():
        for round_ in range(1, a.rounds + 1):
            for size in (int(x) for x in a.sizes.split(",")):
                settings.batch_size = size
                seconds.clear()
                began = time.perf_counter()
                evaluate.rank_classify(s.model, features, candidates, settings,
                                       generate_with=s.tokenizer)
                phases = ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
                print(f"round {round_}  eval_batch_size {size:4d}  "
                      f"{time.perf_counter() - began:6.2f} s  ({phases})", flush=True)


if __name__ == "__main__":
    main()
