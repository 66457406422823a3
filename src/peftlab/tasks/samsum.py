"""SAMSum dialogue summarization, scored with ROUGE."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from peftlab.errors import DataError
from peftlab.tasks.base import Example, GenerationTask, TaskData
from peftlab.tasks.common import Template, absolute_data_dir, data_dir, load_hub_split
from peftlab.tasks.readers import read_jsonl

TEMPLATE = "Summarize this dialogue:\n{text}"


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data_dir: str | None = None
    template: Template = TEMPLATE


def normalise_dialogue(text: str) -> str:
    """Turns are separated by \\r\\n in most rows and \\n in some: one separator, no edges."""
    return "\n".join(t.strip() for t in text.replace("\r\n", "\n").split("\n") if t.strip())


absolute_paths = absolute_data_dir


def build(args: Args) -> GenerationTask:
    def read(split: str) -> tuple[list[Example], int]:
        root = data_dir(args.data_dir)
        if root is not None:
            path = root / "samsum" / f"{split}.jsonl"
            rows = [(f"{path}:{i}", r) for i, r in read_jsonl(path, ["id", "dialogue", "summary"])]
        else:
            hub = load_hub_split("knkarthick/samsum", None, split)
            rows = [(f"samsum {split} row {j}", r) for j, r in enumerate(hub)]
        examples, empty = [], 0
        for where, r in rows:
            dialogue = normalise_dialogue(r["dialogue"] or "")
            summary = (r["summary"] or "").strip()
            if not dialogue:
                if split != "train":  # evaluation sets are never silently changed
                    raise DataError(f"{where}: empty dialogue in the {split} set")
                empty += 1  # train id 13828807 is a known empty dialogue
                continue
            if not summary:
                raise DataError(f"{where}: empty summary")
            examples.append(
                Example(str(r["id"]), args.template.format(text=dialogue), summary, None, dialogue)
            )
        return examples, empty

    def load() -> TaskData:
        train, empty = read("train")
        validation, _ = read("validation")
        test, _ = read("test")
        return TaskData(train, validation, test, {"train_dropped_empty_dialogues": empty})

    return GenerationTask("samsum", load, max_source_length=512, max_target_length=128,
                          max_new_tokens=96)
