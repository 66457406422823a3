"""Model-free baselines: the floor any trained model must clear."""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, ConfigDict

from peftlab.methods.base import Baseline


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


def majority(train: list, examples: list) -> list[str]:
    """The most frequent training label word for every example."""
    word = Counter(ex.target for ex in train).most_common(1)[0][0]
    return [word] * len(examples)


def lead3(train: list, examples: list) -> list[str]:
    """The first three utterances of the dialogue (the classic summarization baseline)."""
    return ["\n".join(ex.text.split("\n")[:3]) for ex in examples]


MAJORITY = Baseline("majority", Args, "classification", majority,
                    "majority class of the training sample", uses_training_sample=True)
LEAD3 = Baseline("lead-3", Args, "generation", lead3, "first three utterances of the dialogue")
