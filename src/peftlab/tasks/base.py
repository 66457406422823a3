"""What every task is made of: examples, the two task kinds, and the low-resource protocol.

A task turns its files into `Example`s (template applied) and scores predictions. The
protocol (`prepare_splits`) is shared: a validation set kept apart from the test set and
drawn once with a fixed seed, training examples that also occur in validation or test
removed, and `train_size` examples drawn with the run's seed (stratified by class).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from peftlab.errors import ConfigError, DataError

# The validation draw does not depend on the run's seed: every run of a study, whatever its
# seed, method or learning rate, is selected on the same validation examples.
VALIDATION_SEED = 1234


@dataclass(frozen=True)
class Example:
    id: str
    source: str  # the model's input text, template applied
    target: str  # the reference output: a label word or a summary
    label: int | None = None  # class index, classification only
    text: str = ""  # the raw input (dedupe, lead-3)


@dataclass
class TaskData:
    """A task's examples before sampling. `validation_pool=None`: draw validation from train."""

    train_pool: list[Example]
    validation_pool: list[Example] | None
    test: list[Example]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    notes: dict[str, Any]


@dataclass
class ClassificationTask:
    """Text-to-text classification: the target is a label word; accuracy by rank classification."""

    name: str
    load: Callable[[], TaskData]
    label_words: tuple[str, ...]
    max_source_length: int = 256
    max_target_length: int = 8
    max_new_tokens: int = 8
    kind: Literal["classification"] = "classification"
    primary_metric: str = "accuracy"
    # what `selection_metric` may name besides the loss
    selectable_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "generation_exact_match")
    higher_is_better: bool = True

    def metrics(
        self, ranked: list[int], generated: list[str] | None, examples: list[Example]
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Accuracy from rank classification; exact match and invalid rate from generation.

        Every row's `scores` are on the metrics' own 0-100 scale (100 = right, 0 = wrong), so
        each metric is the mean of its per-example scores: the report's tests over examples
        and its tables then speak in the same units.
        """
        correct = [100.0 * (p == ex.label) for p, ex in zip(ranked, examples, strict=True)]
        out = {"accuracy": float(np.mean(correct)) if correct else float("nan")}
        rows: list[dict[str, Any]] = [
            {"prediction": self.label_words[p], "scores": {"accuracy": c}}
            for p, c in zip(ranked, correct)
        ]
        if generated is not None:
            norm = [g.strip().lower() for g in generated]
            valid = [g in self.label_words for g in norm]
            exact = [100.0 * (g == ex.target) for g, ex in zip(norm, examples, strict=True)]
            out["generation_exact_match"] = float(np.mean(exact))
            out["invalid_generation_rate"] = 100.0 * (1.0 - float(np.mean(valid)))
            for row, g, e in zip(rows, generated, exact):
                row["generation"] = g
                row["scores"]["generation_exact_match"] = e
        for row in rows:
            row["score"] = row["scores"][self.primary_metric]
        return out, rows


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@functools.cache
def _segmenter() -> Any:
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> str:
    """One sentence per line, which is what rouge-score's rougeLsum splits on.

    pysbd (rule-based, tested against the Golden Rules set) rather than a regex, which cut
    "Mr." and "p.m." into sentences of their own, or nltk's punkt, whose model must be
    downloaded and cannot be on offline machines.
    """
    sentences = (s.strip() for s in _segmenter().segment(text.strip()))
    return "\n".join(s for s in sentences if s)


@dataclass
class GenerationTask:
    """Text-to-text generation scored with ROUGE (rouge-score, stemming on)."""

    name: str
    load: Callable[[], TaskData]
    max_source_length: int = 512
    max_target_length: int = 128
    max_new_tokens: int = 128
    kind: Literal["generation"] = "generation"
    # rougeLsum: the summary-level ROUGE-L that papers report as R-L (on SAMSum, the
    # sentence-level rougeL gave LEAD-3 24.2 against the papers' 29.4)
    primary_metric: str = "rougeLsum"
    higher_is_better: bool = True
    selectable_metrics: ClassVar[tuple[str, ...]] = ROUGE_TYPES

    def metrics(
        self, generated: list[str], examples: list[Example]
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        rows: list[dict[str, Any]] = []
        for pred, ex in zip(generated, examples, strict=True):
            s = scorer.score(split_sentences(ex.target), split_sentences(pred))
            scores = {k: 100.0 * s[k].fmeasure for k in ROUGE_TYPES}
            rows.append({"prediction": pred, "score": scores[self.primary_metric], "scores": scores})
        out = {k: float(np.mean([r["scores"][k] for r in rows])) for k in ROUGE_TYPES}
        return out, rows


Task = ClassificationTask | GenerationTask


def sample_examples(
    examples: list[Example], k: int | Literal["all"], seed: int, stratify: bool
) -> list[Example]:
    """Draw k examples with `seed`; stratified: each class keeps its share (largest remainder)."""
    if k == "all":
        return list(examples)
    rng = np.random.default_rng(seed)
    if not stratify:
        idx = rng.permutation(len(examples))[:k]
        return [examples[i] for i in sorted(idx)]
    by_label: dict[Any, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    labels = sorted(by_label, key=str)
    shares = np.array([len(by_label[c]) for c in labels], dtype=float) * k / len(examples)
    counts = np.floor(shares).astype(int)
    for j in np.argsort(-(shares - counts), kind="stable")[: k - counts.sum()]:
        counts[j] += 1
    chosen: list[int] = []
    for c, n in zip(labels, counts):
        pool = by_label[c]
        chosen.extend(pool[i] for i in rng.permutation(len(pool))[:n])
    return [examples[i] for i in rng.permutation(sorted(chosen))]


def _check_size(name: str, size: int | str, available: int, what: str) -> None:
    if isinstance(size, int) and size > available:
        raise ConfigError(
            f"`{name}` is {size}, larger than the {available} {what} available"
        )


def prepare_splits(
    task: Task,
    train_size: int | Literal["all"],
    val_size: int | Literal["all"],
    test_size: int | Literal["all"],
    seed: int,
) -> Splits:
    """The low-resource protocol: fixed validation draw, dedupe, seeded stratified train draw."""
    data = task.load()
    stratify = task.kind == "classification"
    notes = dict(data.notes)
    # A validation example that is also a test example would let selection see the test set:
    # dropped before the draw and counted, as training examples are (by the task's text).
    test_texts = {ex.text for ex in data.test}
    if data.validation_pool is None:
        # e.g. SST-2: its labelled test set is GLUE dev, so validation comes out of train.
        candidates = [ex for ex in data.train_pool if ex.text not in test_texts]
        notes["validation_dropped_overlap_with_test"] = len(data.train_pool) - len(candidates)
        if not candidates:
            raise DataError(f"task {task.name}: every training example is also a test example "
                            "(the same file for both?): nothing is left to validate or train on")
        if val_size == "all":
            raise ConfigError("`val_size` cannot be 'all' when validation is drawn from train")
        if val_size >= len(candidates):
            raise ConfigError(
                f"`val_size` is {val_size}, but with no validation file validation is drawn "
                f"from the {len(candidates)} training examples, leaving "
                f"{max(len(candidates) - val_size, 0)} to train on: give a validation file "
                "or a smaller val_size")
        validation = sample_examples(candidates, val_size, VALIDATION_SEED, stratify)
        taken = {ex.id for ex in validation}
        pool = [ex for ex in data.train_pool if ex.id not in taken]
        notes["validation_source"] = "train"
    else:
        candidates = [ex for ex in data.validation_pool if ex.text not in test_texts]
        notes["validation_dropped_overlap_with_test"] = (len(data.validation_pool)
                                                         - len(candidates))
        _check_size("val_size", val_size, len(candidates), "validation examples")
        validation = sample_examples(candidates, val_size, VALIDATION_SEED, stratify)
        pool = data.train_pool
        notes["validation_source"] = "validation"
    _check_size("test_size", test_size, len(data.test), "test examples")
    # A test subset is for smoke runs only; papers use test_size: all.
    test = sample_examples(data.test, test_size, VALIDATION_SEED, stratify)
    # Whole held-out splits, not just the drawn subsets: no test or validation text trains.
    held_out = {ex.text for ex in data.validation_pool or validation} | test_texts
    deduped = [ex for ex in pool if ex.text not in held_out]
    notes["train_dropped_overlap_with_validation_or_test"] = len(pool) - len(deduped)
    if pool and not deduped:
        raise DataError(f"task {task.name}: every training example is also in validation or "
                        f"test ({len(pool)} dropped as overlap): nothing is left to train on")
    _check_size("train_size", train_size, len(deduped), "training examples")
    train = sample_examples(deduped, train_size, seed, stratify)
    if not train or not validation or not test:
        raise DataError(f"task {task.name}: an empty split after sampling")
    notes.update(train=len(train), validation=len(validation), test=len(test))
    return Splits(train, validation, test, notes)
