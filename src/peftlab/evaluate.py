"""Batched evaluation: rank classification, generation, teacher-forced loss, metrics.

Only the model's public `forward` and `generate` are used, so every method (plain modules,
peft wrappers, prefix hooks) is evaluated through the same code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from peftlab.data import IGNORE_INDEX, Features, pad, sorted_batches
from peftlab.tasks import ClassificationTask, Example, Task


@dataclass
class EvalSettings:
    batch_size: int
    max_new_tokens: int
    num_beams: int
    device: torch.device
    bf16: bool
    pad_id: int = 0
    generate: bool = True  # classification: also generate, for exact match and invalid rate
    progress: bool = True


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict[str, Any]]  # per example, in the order of the examples


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _picked_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # peft's optional decoder prompt adds positions in front: the labels are the last T.
    logits = logits[:, -labels.shape[1]:, :].float()
    logp = torch.log_softmax(logits, dim=-1)
    mask = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).cpu()


def _prompt_outside_encoder(model: nn.Module) -> bool:
    """peft prompt tuning adds its prompt in the wrapper's forward, not in the encoder."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def _token_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                    s: EvalSettings) -> torch.Tensor:
    """log p(label token | input, previous labels), 0 where labels are padding. (rows, T)"""
    input_ids, labels = input_ids.to(s.device), labels.to(s.device)
    with autocast(s.device, s.bf16):
        logits = model(input_ids=input_ids, attention_mask=(input_ids != s.pad_id).long(),
                       labels=labels).logits
    return _picked_logprobs(logits, labels)


def _candidate_logprobs(model: nn.Module, input_ids: torch.Tensor, candidates: torch.Tensor,
                        s: EvalSettings) -> torch.Tensor:
    """Token log-probs of every candidate for every input: (rows * candidates, T).

    The encoder runs once per input and its states are shared by all candidates (the
    decoder is the only part that depends on the label), except for peft prompt tuning,
    whose prompt is added outside the encoder module.
    """
    n = candidates.shape[0]
    labels = candidates.repeat(input_ids.shape[0], 1).to(s.device)
    if _prompt_outside_encoder(model):
        return _token_logprobs(model, input_ids.repeat_interleave(n, dim=0), labels, s)
    input_ids = input_ids.to(s.device)
    mask = (input_ids != s.pad_id).long()
    with autocast(s.device, s.bf16):
        states = model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
        # decoder inputs, not labels: with labels the model also computes a loss we discard
        logits = model(encoder_outputs=(states.repeat_interleave(n, dim=0),),
                       attention_mask=mask.repeat_interleave(n, dim=0),
                       decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels),
                       ).logits
    return _picked_logprobs(logits, labels)


@torch.no_grad()
def rank_classify(model: nn.Module, features: Features, candidates: list[list[int]],
                  s: EvalSettings, desc: str = "rank") -> tuple[np.ndarray, np.ndarray]:
    """Score every label word for every example.

    Returns (scores (N, C): summed log-likelihood of each label word without its EOS, so the
    answer is always a valid label; nll (N, C, 2): summed NLL over the word and EOS, and the
    token count, for the teacher-forced loss).
    """
    n_cand = len(candidates)
    scores = np.zeros((len(features), n_cand))
    nll = np.zeros((len(features), n_cand, 2))
    cand = pad(candidates, IGNORE_INDEX)
    lengths = torch.tensor([len(c) for c in candidates])
    word_mask = torch.arange(cand.shape[1])[None, :] < (lengths[:, None] - 1)  # drop EOS
    batches = sorted_batches([len(x) for x in features.input_ids], max(1, s.batch_size // n_cand))
    for idx in tqdm(batches, desc=desc, leave=False, disable=not s.progress or None):
        inputs = pad([features.input_ids[i] for i in idx], s.pad_id)
        lp = _candidate_logprobs(model, inputs, cand, s).view(len(idx), n_cand, -1).double()
        scores[idx] = (lp * word_mask).sum(-1).numpy()
        nll[idx, :, 0] = (-lp.sum(-1)).numpy()
        nll[idx, :, 1] = lengths.numpy()
    return scores, nll


@torch.no_grad()
def teacher_forced_loss(model: nn.Module, features: Features, s: EvalSettings) -> float:
    """Mean token cross-entropy of the references (the validation loss)."""
    total, count = 0.0, 0
    batches = sorted_batches([len(x) for x in features.input_ids], s.batch_size)
    for idx in tqdm(batches, desc="loss", leave=False, disable=not s.progress or None):
        lp = _token_logprobs(model, pad([features.input_ids[i] for i in idx], s.pad_id),
                             pad([features.labels[i] for i in idx], IGNORE_INDEX), s)
        total -= float(lp.double().sum())
        count += sum(len(features.labels[i]) for i in idx)
    return total / max(count, 1)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, features: Features,
             s: EvalSettings) -> list[str]:
    """Greedy (num_beams=1) or beam decoding in length-sorted batches; outputs in input order."""
    out: list[str] = [""] * len(features)
    batches = sorted_batches([len(x) for x in features.input_ids], s.batch_size)
    for idx in tqdm(batches, desc="generate", leave=False, disable=not s.progress or None):
        input_ids = pad([features.input_ids[i] for i in idx], s.pad_id).to(s.device)
        with autocast(s.device, s.bf16):
            generated = model.generate(
                input_ids=input_ids, attention_mask=(input_ids != s.pad_id).long(),
                max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, do_sample=False,
            )
        for i, text in zip(idx, tokenizer.batch_decode(generated, skip_special_tokens=True)):
            out[i] = text.strip()
    return out


def _rows(examples: list[Example], scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": ex.id, "reference": ex.target, **row} for ex, row in zip(examples, scored)]


def evaluate_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task,
                   examples: list[Example], features: Features, s: EvalSettings) -> EvalResult:
    """Loss and the task's metrics on one split."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(task, ClassificationTask):
            candidates = [tokenizer(w)["input_ids"] for w in task.label_words]
            scores, nll = rank_classify(model, features, candidates, s)
            ranked = scores.argmax(axis=1).tolist()
            labels = [ex.label for ex in examples]
            gold = nll[np.arange(len(labels)), labels]
            loss = float(gold[:, 0].sum() / gold[:, 1].sum())
            generated = generate(model, tokenizer, features, s) if s.generate else None
            metrics, scored = task.metrics(ranked, generated, examples)
        else:
            loss = teacher_forced_loss(model, features, s)
            metrics, scored = task.metrics(generate(model, tokenizer, features, s), examples)
    finally:
        model.train(was_training)
    return EvalResult({"loss": loss, **metrics}, _rows(examples, scored))


def evaluate_predictions(task: Task, predictions: list[str], examples: list[Example]) -> EvalResult:
    """Metrics for model-free predictions (baselines)."""
    if isinstance(task, ClassificationTask):
        ranked = [task.label_words.index(p) for p in predictions]
        metrics, scored = task.metrics(ranked, None, examples)
    else:
        metrics, scored = task.metrics(predictions, examples)
    return EvalResult(metrics, _rows(examples, scored))
