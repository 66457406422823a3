"""Batched evaluation: rank classification, generation, teacher-forced loss, metrics.

Only public interfaces are used (the model's `forward` and `generate`, the KV cache that
`forward` returns, peft's `get_base_model`), so every method (plain modules, peft wrappers,
prefix hooks) is evaluated through the same code.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from peftlab.data import IGNORE_INDEX, Features, pad, sorted_batches
from peftlab.denormals import flushed_denormals
from peftlab.pack import cast_stacks
from peftlab.tasks import ClassificationTask, Example, Task


@dataclass
class EvalSettings:
    batch_size: int
    max_new_tokens: int
    num_beams: int
    device: torch.device
    bf16: bool  # evaluate_model evaluates a bf16 copy of the model
    pad_id: int = 0
    generate: bool = True  # classification: also generate, for exact match and invalid rate
    progress: bool = True
    label_scoring: str = "sum"  # rank classification: "sum" or "mean" over a label's tokens
    # the members of the model's pack (peftlab.pack) evaluated together: each batch of inputs
    # goes through the model once per member, all in one batch routed row by row. None: the
    # model as it is (a run alone, or one member under `Router.evaluating`)
    members: tuple[int, ...] | None = None

    @property
    def copies(self) -> int:
        return len(self.members) if self.members else 1


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict[str, Any]]  # per example, in the order of the examples


def inference_model(model: nn.Module, bf16: bool) -> nn.Module:
    """The model to evaluate: itself, or for bf16 a copy cast to bf16 once.

    Not autocast: its cast cache keeps only trainable leaves, so every frozen weight (all of
    them but the adapter's) is cast again at every call; measured on a CPU with AMX, rank
    classification ran 1.5x faster than fp32 under autocast and 2.1-2.6x with a bf16 copy
    (docs/speed.md). The copy also leaves the trained fp32 weights untouched.
    """
    if not bf16:
        return model
    copied = copy.deepcopy(model).to(torch.bfloat16)
    cast_stacks(copied, torch.bfloat16)  # a packed model's trainable tensors (peftlab.pack)
    return copied


def _tiled(x: torch.Tensor, s: EvalSettings) -> torch.Tensor:
    """A batch of inputs once per evaluated member, member after member."""
    return x.repeat(s.copies, *([1] * (x.dim() - 1))) if s.members else x


def _routed(model: nn.Module, s: EvalSettings, rows: int) -> contextlib.AbstractContextManager:
    """Each row of a tiled batch of `rows` inputs routed to its member."""
    if not s.members:
        return contextlib.nullcontext()
    route = torch.tensor(s.members, device=s.device).repeat_interleave(rows)
    return model.peftlab_pack.router.routing(route)


def _each(result: Any, s: EvalSettings) -> list[Any]:
    """One result per evaluated member: `s.members`' list, or a run's single result."""
    return result if s.members else [result]


LOGPROB_CHUNK_ELEMENTS = 2**26  # fp32 vocabulary scores per chunk: 256 MB


def _picked_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) = score(label) - logsumexp(scores), a chunk of rows at a time: a full
    fp32 log-softmax of every position at once cost as much again as the logits (SAMSum
    validation of a pack of 27 evaluated together: about 21 GB of logits)."""
    labels = labels.to(logits.device)
    rows, positions, vocabulary = logits.shape
    step = max(1, LOGPROB_CHUNK_ELEMENTS // max(positions * vocabulary, 1))
    out = []
    for start in range(0, rows, step):
        chunk = logits[start:start + step].float()
        index = labels[start:start + step].clamp(min=0).unsqueeze(-1)
        picked = chunk.gather(-1, index).squeeze(-1) - torch.logsumexp(chunk, dim=-1)
        out.append(picked * (labels[start:start + step] != IGNORE_INDEX))
    return torch.cat(out).cpu()


def _token_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                    s: EvalSettings) -> torch.Tensor:
    """log p(label token | input, previous labels), 0 where labels are padding. (rows, T)"""
    input_ids, labels = input_ids.to(s.device), labels.to(s.device)
    logits = model(input_ids=input_ids, attention_mask=(input_ids != s.pad_id).long(),
                   labels=labels).logits
    return _picked_logprobs(logits, labels)


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (its layers carry LoRA/IA3), else itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _cache_argument(model_class: type) -> str:
    # transformers 5.2x renamed forward's `past_key_values` to `cache`; accept both
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters \
        else "past_key_values"


@dataclass
class _Encoded:
    """A batch through the encoder and the first decoder position (shared by all labels)."""

    states: torch.Tensor  # (B, S', d); S' counts peft prompt-tuning positions too
    mask: torch.Tensor  # (B, S')
    first_logits: torch.Tensor  # (B, 1, V): the next-token logits after the start token
    cache: Any  # the decoder's KV cache: self-attention at position 0, cross-attention K/V


def _encode(model: nn.Module, input_ids: torch.Tensor, s: EvalSettings) -> _Encoded:
    """Through the model's own forward (not its encoder module), so that peft prompt tuning,
    which adds its prompt in the wrapper, is encoded like every other method."""
    input_ids = input_ids.to(s.device)
    mask = (input_ids != s.pad_id).long()
    start = torch.full((len(input_ids), 1), model.config.decoder_start_token_id, device=s.device)
    out = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=start,
                use_cache=True)
    states = out.encoder_last_hidden_state
    prompt = states.shape[1] - mask.shape[1]  # peft prompt tuning prepends unmasked positions
    if prompt:
        mask = torch.cat([mask.new_ones(len(mask), prompt), mask], dim=1)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    return _Encoded(states, mask, out.logits[:, -1:], cache)


def _candidate_logprobs(model: nn.Module, encoded: _Encoded, candidates: torch.Tensor,
                        s: EvalSettings) -> torch.Tensor:
    """Token log-probs of every candidate for every encoded input: (rows * candidates, T).

    Repeating the inputs once per candidate would run the encoder, and the cross-attention
    key/value projections of every encoder position, once per candidate. Here they run once:
    the decoder's cache after the start token is copied to every candidate and only the
    candidates' own tokens go through the decoder.
    """
    n, rows = candidates.shape[0], len(encoded.states)
    labels = candidates.repeat(rows, 1).to(s.device)
    logits = encoded.first_logits.repeat_interleave(n, dim=0)
    if labels.shape[1] > 1:
        encoded.cache.batch_repeat_interleave(n)
        decoder = _transformers_model(model)
        rest = decoder(
            encoder_outputs=(encoded.states.repeat_interleave(n, dim=0),),
            attention_mask=encoded.mask.repeat_interleave(n, dim=0),
            decoder_input_ids=labels[:, :-1].clamp(min=s.pad_id),  # teacher forcing
            use_cache=True, **{_cache_argument(type(decoder)): encoded.cache},
        ).logits
        logits = torch.cat([logits, rest], dim=1)
    return _picked_logprobs(logits, labels)


# Generation settings the greedy loop below reproduces (token ids) or that greedy decoding
# ignores or overrides; any other (a repetition penalty, forced tokens, a minimum length)
# sends decoding to transformers' `generate`.
_GREEDY_SAFE = {"decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id",
                "use_cache", "output_attentions", "output_hidden_states", "return_dict_in_generate",
                "do_sample", "num_beams", "max_length", "max_new_tokens", "temperature", "top_k",
                "top_p", "transformers_version", "_from_model_config"}


def _greedy_from_cache(model: nn.Module, encoded: _Encoded, s: EvalSettings
                       ) -> torch.Tensor | None:
    """Greedy decoding that continues from `_encode`'s cache: the start position, the
    cross-attention keys and values of every encoder position and the first token's logits are
    already computed. Returns what `generate` returns, or None where it would differ.

    Our own loop because transformers' `generate` does not continue from such a cache (given
    it as `past_key_values`, it fed the start token again and its output changed). On the
    SST-2 test split (fp32, 32 inputs a batch) this took the free generation from 7.4 to 3.6
    ms an example: `generate` computed the cross-attention keys and values a second time and
    pays a fixed cost per call. Afterwards the cache is cut back to the start position, as
    the label scoring that follows expects.
    """
    decoder = _transformers_model(model)
    config = decoder.generation_config
    eos, pad_id = config.eos_token_id, config.pad_token_id
    if (s.num_beams != 1 or eos is None or pad_id is None
            or not set(config.to_diff_dict()) <= _GREEDY_SAFE):
        return None
    eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=encoded.states.device)
    cached = encoded.cache.get_seq_length()
    token = encoded.first_logits[:, -1].argmax(-1, keepdim=True)
    ids = [torch.full_like(token, model.config.decoder_start_token_id), token]
    done = torch.isin(token[:, 0], eos)
    for _ in range(s.max_new_tokens - 1):
        if done.all():
            break
        logits = decoder(encoder_outputs=(encoded.states,), attention_mask=encoded.mask,
                         decoder_input_ids=token, use_cache=True,
                         **{_cache_argument(type(decoder)): encoded.cache}).logits
        # finished rows get padding, as in `generate`
        token = logits[:, -1].argmax(-1, keepdim=True).masked_fill(done[:, None], pad_id)
        ids.append(token)
        done |= torch.isin(token[:, 0], eos)
    if encoded.cache.get_seq_length() > cached:  # a negative count removes that many positions
        encoded.cache.crop(cached - encoded.cache.get_seq_length())
    return torch.cat(ids, dim=1)


def _generate_ids(model: nn.Module, input_ids: torch.Tensor, s: EvalSettings,
                  encoded: _Encoded | None = None) -> torch.Tensor:
    """Greedy or beam decoding; from already computed encoder states when given."""
    kwargs = dict(max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, do_sample=False)
    if encoded is not None and (ids := _greedy_from_cache(model, encoded, s)) is not None:
        return ids
    if encoded is not None:
        return _transformers_model(model).generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded.states),
            attention_mask=encoded.mask, **kwargs)
    input_ids = input_ids.to(s.device)
    return model.generate(input_ids=input_ids, attention_mask=(input_ids != s.pad_id).long(),
                          **kwargs)


@dataclass
class Ranked:
    scores: np.ndarray  # (N, C): each label's score (see `label_scores`)
    nll: np.ndarray  # (N, C, 2): summed NLL over the word and EOS, and its token count
    generated: list[str] | None  # free generations, when a tokenizer was given


def label_scores(logprobs: np.ndarray, lengths: np.ndarray, scoring: str) -> np.ndarray:
    """A label's score from its token log-probabilities (..., T), EOS included, 0 past its end.

    The end-of-sequence token is part of the score: without it, a label that is a token
    prefix of another ("good" and "good movie") always scores at least as high, since the
    longer label only adds negative terms, and could never lose. `mean` divides by the
    label's token count, for label words of very different lengths.
    """
    total = logprobs.sum(-1)
    return total / lengths if scoring == "mean" else total


@torch.no_grad()
def rank_classify(model: nn.Module, features: Features, candidates: list[list[int]],
                  s: EvalSettings, generate_with: PreTrainedTokenizerBase | None = None,
                  desc: str = "rank") -> list[Ranked] | Ranked:
    """Score every label word for every example; the answer (argmax of `scores`) is always a
    valid label. With `generate_with`, also decode freely from the same encoder states, for
    exact match and the invalid-generation rate. With `s.members`, one Ranked per member."""
    n_cand, copies = len(candidates), s.copies
    scores = np.zeros((copies, len(features), n_cand))
    nll = np.zeros((copies, len(features), n_cand, 2))
    generated: list[list[str]] | None = [[""] * len(features) for _ in range(copies)] \
        if generate_with is not None else None
    cand = pad(candidates, IGNORE_INDEX)
    lengths = np.array([len(c) for c in candidates], dtype=float)
    batches = sorted_batches([len(x) for x in features.input_ids], max(1, s.batch_size // n_cand))
    for idx in tqdm(batches, desc=desc, leave=False, disable=not s.progress or None):
        inputs = _tiled(pad([features.input_ids[i] for i in idx], s.pad_id), s)
        with _routed(model, s, len(idx)):
            encoded = _encode(model, inputs, s)
            if generated is not None:  # before scoring, which expands the cache in place
                texts = generate_with.batch_decode(_generate_ids(model, inputs, s, encoded),
                                                   skip_special_tokens=True)
                for row, text in enumerate(texts):
                    generated[row // len(idx)][idx[row % len(idx)]] = text.strip()
            lp = _candidate_logprobs(model, encoded, cand, s)
        lp = lp.view(copies, len(idx), n_cand, -1).double().numpy()
        for m in range(copies):
            scores[m, idx] = label_scores(lp[m], lengths, s.label_scoring)
            nll[m, idx, :, 0] = -lp[m].sum(-1)
            nll[m, idx, :, 1] = lengths
    ranked = [Ranked(scores[m], nll[m], generated[m] if generated is not None else None)
              for m in range(copies)]
    return ranked if s.members else ranked[0]


@torch.no_grad()
def teacher_forced_loss(model: nn.Module, features: Features, s: EvalSettings
                        ) -> list[float] | float:
    """Mean token cross-entropy of the references (the validation loss); one per member with
    `s.members`."""
    total, count = np.zeros(s.copies), 0
    batches = sorted_batches([len(x) for x in features.input_ids], s.batch_size)
    for idx in tqdm(batches, desc="loss", leave=False, disable=not s.progress or None):
        inputs = _tiled(pad([features.input_ids[i] for i in idx], s.pad_id), s)
        labels = _tiled(pad([features.labels[i] for i in idx], IGNORE_INDEX), s)
        with _routed(model, s, len(idx)):
            lp = _token_logprobs(model, inputs, labels, s)
        total -= lp.double().view(s.copies, -1).sum(1).numpy()
        count += sum(len(features.labels[i]) for i in idx)
    losses = [float(t) / max(count, 1) for t in total]
    return losses if s.members else losses[0]


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, features: Features,
             s: EvalSettings) -> list[list[str]] | list[str]:
    """Greedy (num_beams=1) or beam decoding in length-sorted batches; outputs in input order
    (a list per member with `s.members`)."""
    out: list[list[str]] = [[""] * len(features) for _ in range(s.copies)]
    batches = sorted_batches([len(x) for x in features.input_ids], s.batch_size)
    for idx in tqdm(batches, desc="generate", leave=False, disable=not s.progress or None):
        inputs = _tiled(pad([features.input_ids[i] for i in idx], s.pad_id), s)
        with _routed(model, s, len(idx)):
            generated = _generate_ids(model, inputs, s)
        for row, text in enumerate(tokenizer.batch_decode(generated, skip_special_tokens=True)):
            out[row // len(idx)][idx[row % len(idx)]] = text.strip()
    return out if s.members else out[0]


def _rows(examples: list[Example], scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": ex.id, "reference": ex.target, **row} for ex, row in zip(examples, scored)]


@flushed_denormals()
def evaluate_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task,
                   examples: list[Example], features: Features, s: EvalSettings
                   ) -> EvalResult | list[EvalResult]:
    """Loss and the task's metrics on one split; one result per member with `s.members`."""
    was_training = model.training
    model.eval()
    evaluated = inference_model(model, s.bf16)
    results = []
    try:
        if isinstance(task, ClassificationTask):
            candidates = [tokenizer(w)["input_ids"] for w in task.label_words]
            ranked = rank_classify(evaluated, features, candidates, s,
                                   generate_with=tokenizer if s.generate else None)
            labels = [ex.label for ex in examples]
            for r in _each(ranked, s):
                gold = r.nll[np.arange(len(labels)), labels]
                loss = float(gold[:, 0].sum() / gold[:, 1].sum())
                metrics, scored = task.metrics(r.scores.argmax(axis=1).tolist(), r.generated,
                                               examples)
                results.append(EvalResult({"loss": loss, **metrics}, _rows(examples, scored)))
        else:
            losses = teacher_forced_loss(evaluated, features, s)
            outputs = generate(evaluated, tokenizer, features, s)
            for loss, texts in zip(_each(losses, s), _each(outputs, s)):
                metrics, scored = task.metrics(texts, examples)
                results.append(EvalResult({"loss": loss, **metrics}, _rows(examples, scored)))
    finally:
        model.train(was_training)
    return results if s.members else results[0]


def evaluate_predictions(task: Task, predictions: list[str], examples: list[Example]) -> EvalResult:
    """Metrics for model-free predictions (baselines)."""
    if isinstance(task, ClassificationTask):
        ranked = [task.label_words.index(p) for p in predictions]
        metrics, scored = task.metrics(ranked, None, examples)
    else:
        metrics, scored = task.metrics(predictions, examples)
    return EvalResult(metrics, _rows(examples, scored))
