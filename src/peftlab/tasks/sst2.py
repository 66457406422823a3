"""SST-2 sentiment classification (GLUE). Test = GLUE dev; validation is drawn from GLUE train."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from peftlab.errors import DataError
from peftlab.tasks.base import ClassificationTask, Example, TaskData
from peftlab.tasks.common import Template, absolute_data_dir, data_dir, load_hub_split
from peftlab.tasks.readers import read_tsv

LABEL_WORDS = ("negative", "positive")
# A Flan-style instruction: the untuned (instruction-tuned) model is asked the way it was taught.
TEMPLATE = (
    "Review:\n{text}\nIs this movie review sentence negative or positive?\n"
    "OPTIONS:\n- negative\n- positive"
)


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data_dir: str | None = None
    template: Template = TEMPLATE


def _example(split: str, key: str, text: str, label: str, where: str, template: str) -> Example:
    # GLUE keeps a trailing space on every sentence; the T5 tokenizer can turn it into a token.
    text = text.strip()
    if not text:
        raise DataError(f"{where}: empty sentence")
    if label not in ("0", "1"):
        raise DataError(f"{where}: label {label!r} is not 0 or 1 (negative, positive)")
    y = int(label)
    return Example(f"{split}-{key}", template.format(text=text), LABEL_WORDS[y], y, text)


absolute_paths = absolute_data_dir


def build(args: Args) -> ClassificationTask:
    def load() -> TaskData:
        root = data_dir(args.data_dir)
        splits = {}
        for split, fname in (("train", "train.tsv"), ("test", "dev.tsv")):
            if root is not None:
                path = root / "sst2" / fname
                rows = read_tsv(path, ["sentence", "label"])
                splits[split] = [
                    _example(split, str(i), r["sentence"], r["label"], f"{path}:{i}", args.template)
                    for i, r in rows
                ]
            else:
                hub = load_hub_split("glue", "sst2", "train" if split == "train" else "validation")
                splits[split] = [
                    _example(split, str(r["idx"]), r["sentence"], str(r["label"]),
                             f"glue/sst2 row {r['idx']}", args.template)
                    for r in hub
                ]
        return TaskData(splits["train"], None, splits["test"])

    return ClassificationTask("sst2", load, LABEL_WORDS, max_source_length=128,
                              max_target_length=4, max_new_tokens=4)
