"""What a reader must be told about the data and the model, beyond the numbers: where a
task's test split comes from, which models saw which tasks in training, what the model is.

Extend the tables below when a task or model family is added: the report states every entry
that matches a study.
"""

from __future__ import annotations

import re

from peftlab.models import PRESETS

# task -> where its test split comes from, when that is not the split's plain name
TEST_SPLITS = {
    "sst2": "the test examples come from the GLUE SST-2 dev set (872 sentences; a study's "
            "`test_size` may take a subset): GLUE's test labels are not public, so validation is "
            "drawn from the training set",
}

# (model name pattern, tasks, where the model saw them): the untuned model is then not a
# zero-shot result on held-out data. Flan 2022's task list includes GLUE SST-2 and SAMSum
# (Longpre et al. 2023, "The Flan Collection", appendix task list; Chung et al. 2022).
KNOWN_OVERLAPS = [
    (r"(^|/)flan-t5", ("sst2", "samsum"), "the Flan 2022 instruction-tuning collection"),
    (r"(^|/)flan-ul2", ("sst2", "samsum"), "the Flan 2022 instruction-tuning collection"),
]


def test_split_note(task: str) -> str | None:
    return TEST_SPLITS.get(task)


def overlaps(model: str, tasks: list[str]) -> list[str]:
    """Sentences naming the study's tasks that `model` was trained on, by the table above."""
    out = []
    for pattern, seen, where in KNOWN_OVERLAPS:
        hit = [t for t in tasks if t in seen]
        if hit and re.search(pattern, model, flags=re.IGNORECASE):
            out.append(f"{model} was trained on {' and '.join(hit)} in {where}: its untuned "
                       "row is the model as released on tasks it has seen, not a zero-shot "
                       "result on held-out data")
    return out


def describe_model(model: str) -> str:
    """'t5-tiny (peftlab's randomly initialised preset ...)' or the model's own name."""
    if model in PRESETS:
        return (f"{model} (peftlab's randomly initialised preset: random weights, so its "
                "numbers prove the pipeline and say nothing about the methods)")
    return model
