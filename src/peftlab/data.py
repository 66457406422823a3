"""Tokenised examples, length-grouped batches and dynamic padding."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from peftlab.tasks import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Features:
    input_ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_source_length: int,
    max_target_length: int,
) -> Features:
    sources = tokenizer([ex.source for ex in examples], truncation=True,
                        max_length=max_source_length)["input_ids"]
    targets = tokenizer([ex.target for ex in examples], truncation=True,
                        max_length=max_target_length)["input_ids"]
    return Features(sources, targets)


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(features: Features, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch padded to its own longest sequence (dynamic padding)."""
    input_ids = pad([features.input_ids[i] for i in idx], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad_id).long(),
        "labels": pad([features.labels[i] for i in idx], IGNORE_INDEX),
    }


def length_grouped_batches(lengths: list[int], batch_size: int, rng: np.random.Generator,
                           group_batches: int = 50) -> list[list[int]]:
    """One epoch of batches: shuffle, sort by length inside groups of `group_batches` batches,
    cut into batches, shuffle the batches. Similar lengths share a batch, so padding is small,
    and the order stays random."""
    order = rng.permutation(len(lengths))
    group = batch_size * group_batches
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start:start + group], key=lambda i: -lengths[i])
        batches.extend([int(i) for i in chunk[j:j + batch_size]]
                       for j in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def training_batches(features: Features, batch_size: int, seed: int, pad_id: int,
                     skip: int = 0, group_by_length: bool = True,
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless dynamically padded batches, epoch after epoch: length-grouped, or random
    (groups of one batch: sorting inside a batch changes nothing but its row order).

    Each epoch's order depends only on (seed, epoch), so a resumed run skips the `skip`
    batches it already consumed and continues with exactly the batches it would have seen.
    """
    lengths = [len(s) + len(t) for s, t in zip(features.input_ids, features.labels)]
    epoch, seen = 0, 0
    while True:
        batches = length_grouped_batches(lengths, batch_size, np.random.default_rng([seed, epoch]),
                                         group_batches=50 if group_by_length else 1)
        for idx in batches:
            if seen >= skip:
                yield collate(features, idx, pad_id)
            seen += 1
        epoch += 1


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: longest first, so padding is minimal and memory peaks early."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
