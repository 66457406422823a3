"""The reference pipeline a user would write from the Hugging Face docs
(`Seq2SeqTrainer` + peft + `DataCollatorForSeq2Seq`, `predict_with_generate`), measured the
same way as peftlab."""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

from peftlab_bench.common import CELL, MODEL, SHAPES, peak_memory, setup, sync


def _reference_features(s, examples, src: int, tgt: int) -> list[dict[str, list[int]]]:
    """Tokenised as the Hugging Face summarisation/translation examples do it."""
    enc = s.tokenizer([e.source for e in examples], max_length=src, truncation=True)
    lab = s.tokenizer(text_target=[e.target for e in examples], max_length=tgt, truncation=True)
    return [{"input_ids": i, "labels": t} for i, t in zip(enc["input_ids"], lab["input_ids"])]


def _reference_args(s, cfg, precision: str, **kw: Any):
    from transformers import Seq2SeqTrainingArguments

    base = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate, lr_scheduler_type="linear", max_grad_norm=1.0,
                weight_decay=0.0, optim="adamw_torch", save_strategy="no", report_to="none",
                disable_tqdm=True, use_cpu=s.device.type == "cpu", bf16=precision == "bf16",
                seed=0, dataloader_num_workers=0)
    return Seq2SeqTrainingArguments(**{**base, **kw})


def measure_reference(method: str, shape: str, batch_size: int, steps: int, warmup: int,
                      precision: str, sequential: bool = False,
                      order: list[int] | None = None, n_examples: int = 256,
                      dropout: bool = True, model: str = MODEL) -> dict[str, Any]:
    """What the HF docs show: Seq2SeqTrainer + peft + DataCollatorForSeq2Seq."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, TrainerCallback

    memory = peak_memory()
    cfg, s, features = setup(method, shape, batch_size, n_examples, dropout, model=model,
                              pack=False)
    idx = order if order is not None else list(range(len(features)))
    # A plain list is a valid torch Dataset; `datasets` would add nothing to the timing.
    data = [{"input_ids": features.input_ids[i], "labels": features.labels[i]} for i in idx]
    marks: dict[int, float] = {}
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(s.device)
            marks[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = _reference_args(s, cfg, precision, max_steps=warmup + steps, warmup_steps=0,
                           logging_steps=1,
                           train_sampling_strategy="sequential" if sequential else "random")
    collator = DataCollatorForSeq2Seq(s.tokenizer, model=s.model, padding=True,
                                      label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=s.model, args=args, train_dataset=data,
                             data_collator=collator, callbacks=[Clock()])
    trainer.train()
    seconds = marks[warmup + steps] - marks[warmup]
    examples = steps * batch_size
    return {"seconds": seconds, "examples_per_s": examples / seconds, "losses": losses,
            "peak_memory_mb": memory.peak_mb()}


def measure_reference_eval(shape: str, n: int, batch_size: int, precision: str,
                           max_new_tokens: int | None = None,
                           model: str = MODEL) -> dict[str, Any]:
    """`Seq2SeqTrainer.predict` with `predict_with_generate`, as the HF examples evaluate."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

    cfg, s, _ = setup("untuned", shape, batch_size, 16, model=model)
    task, src, tgt = SHAPES[shape]
    data = _reference_features(s, s.splits.test[:n], src, tgt)
    args = _reference_args(s, cfg, precision, per_device_eval_batch_size=batch_size,
                           predict_with_generate=True,
                           generation_max_length=max_new_tokens and max_new_tokens + 1)
    collator = DataCollatorForSeq2Seq(s.tokenizer, model=s.model, padding=True,
                                      label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=s.model, args=args, data_collator=collator)
    t = time.perf_counter()
    predictions = trainer.predict(data).predictions
    s.tokenizer.batch_decode(predictions.clip(min=0), skip_special_tokens=True)
    return {"examples": len(data), "examples_per_s": len(data) / (time.perf_counter() - t),
            "generation_max_length": args.generation_max_length}


def measure_cell_reference(shape: str, method: str, precision: str, model: str = MODEL,
                           cell: dict[str, Any] | None = None) -> dict[str, Any]:
    """The same cell as the HF examples would run it: Seq2SeqTrainer evaluating with
    `predict_with_generate` every 50 steps, keeping the best checkpoint by the validation
    metric (`load_best_model_at_end`), then `predict` on the test split."""
    import numpy as np
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

    cell = cell or CELL
    start = time.perf_counter()
    task, src, tgt = SHAPES[shape]
    cfg, s, _ = setup(method, shape, 8, 1000, model=model, pack=False, **cell)
    train_data = _reference_features(s, s.splits.train, src, tgt)
    val_data = _reference_features(s, s.splits.validation, src, tgt)
    test_data = _reference_features(s, s.splits.test, src, tgt)
    metric = s.task.primary_metric

    def compute_metrics(pred) -> dict[str, float]:
        ids = np.where(pred.predictions < 0, s.tokenizer.pad_token_id, pred.predictions)
        texts = [t.strip() for t in s.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        labels = np.where(pred.label_ids < 0, s.tokenizer.pad_token_id, pred.label_ids)
        refs = [t.strip() for t in s.tokenizer.batch_decode(labels, skip_special_tokens=True)]
        if shape == "sst2":
            return {metric: float(np.mean([p == r for p, r in zip(texts, refs)]))}
        from rouge_score import rouge_scorer

        from peftlab.tasks.base import split_sentences

        scorer = rouge_scorer.RougeScorer([metric], use_stemmer=True)
        return {metric: float(np.mean([
            scorer.score(split_sentences(r), split_sentences(p))[metric].fmeasure
            for p, r in zip(texts, refs)]))}

    args = _reference_args(
        s, cfg, precision, max_steps=cell["max_steps"],
        warmup_steps=math.ceil(cfg.warmup_ratio * cell["max_steps"]),
        logging_steps=cfg.log_every, eval_strategy="steps", eval_steps=cell["eval_every"],
        save_strategy="steps", save_steps=cell["eval_every"], save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model=metric, greater_is_better=True,
        per_device_eval_batch_size=cfg.eval_batch_size, predict_with_generate=True,
        generation_max_length=cfg.max_new_tokens + 1,
    )
    collator = DataCollatorForSeq2Seq(s.tokenizer, model=s.model, padding=True,
                                      label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=s.model, args=args, train_dataset=train_data,
                             eval_dataset=val_data, data_collator=collator,
                             compute_metrics=compute_metrics)
    evaluations: list[float] = []  # the Trainer's loop calls self.evaluate: timed here
    evaluate = trainer.evaluate

    def timed_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        began = time.perf_counter()
        try:
            return evaluate(*args, **kwargs)
        finally:
            evaluations.append(time.perf_counter() - began)

    trainer.evaluate = timed_evaluate
    began = time.perf_counter()
    setup_s = began - start
    trainer.train()
    training_s = time.perf_counter() - began - sum(evaluations)
    began = time.perf_counter()
    test = trainer.predict(test_data)
    test_s = time.perf_counter() - began
    return {"seconds": time.perf_counter() - start, "test_metrics": test.metrics,
            "test_examples": len(test_data), "evaluations": len(evaluations),
            "phases": {"setup": setup_s, "training": training_s, "validation": sum(evaluations),
                       "test": test_s}}
