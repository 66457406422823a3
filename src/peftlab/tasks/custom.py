"""A task from the user's own files (CSV, TSV, JSONL) or an HF dataset, with a column mapping."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peftlab.errors import DataError
from peftlab.tasks.base import ClassificationTask, Example, GenerationTask, Task, TaskData
from peftlab.tasks.common import Template, load_hub_split
from peftlab.tasks.readers import read_table


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    kind: Literal["classification", "generation"] = "generation"
    train: str | None = Field(None, description="file path, or a split name with hf_dataset")
    validation: str | None = Field(None, description="None: drawn from train")
    test: str | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    input_column: str = "input"
    target_column: str = "target"
    id_column: str | None = None
    label_words: dict[str, str] | None = Field(
        None, description="classification: raw label value -> label word"
    )
    template: Template = "{text}"
    max_source_length: int = Field(512, ge=1)
    max_target_length: int = Field(128, ge=1)
    max_new_tokens: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Args:
        if self.train is None or self.test is None:
            raise ValueError("custom tasks need `train` and `test` (file paths or hf split names)")
        if self.kind == "classification" and not self.label_words:
            raise ValueError("classification needs `label_words` (raw label -> word)")
        return self

    @field_validator("label_words")
    @classmethod
    def _distinct_words(cls, words: dict[str, str] | None) -> dict[str, str] | None:
        seen: dict[str, str] = {}
        for value, word in (words or {}).items():
            # generations are compared lower-cased and stripped: so are the label words
            norm = word.strip().lower()
            if not norm:
                raise ValueError(f"the word for {value!r} is empty")
            if norm in seen:
                raise ValueError(f"{seen[norm]!r} and {value!r} have the same word {word!r}; "
                                 "every class needs its own word")
            seen[norm] = value
        return words


def absolute_paths(args: Args) -> Args:
    """Data files (or a local dataset folder) as absolute paths; hub names and split names
    stay as they are."""
    if args.hf_dataset:
        local = Path(args.hf_dataset).exists()
        return args.model_copy(update={"hf_dataset": os.path.abspath(args.hf_dataset)}) if local else args
    return args.model_copy(update={k: os.path.abspath(v) for k in ("train", "validation", "test")
                                   if (v := getattr(args, k))})


def build(args: Args) -> Task:
    label_values = list(args.label_words or {})
    label_words = tuple((args.label_words or {}).values())

    def read(split: str, source: str) -> list[Example]:
        cols = [args.input_column, args.target_column] + ([args.id_column] if args.id_column else [])
        if args.hf_dataset:
            rows = [(f"{args.hf_dataset}[{source}] row {j}", r)
                    for j, r in enumerate(load_hub_split(args.hf_dataset, args.hf_config, source))]
            for where, r in rows:
                missing = [c for c in cols if c not in r]
                if missing:
                    raise DataError(f"{where}: missing column(s) {missing}")
        else:
            rows = [(f"{source}:{i}", r) for i, r in read_table(source, cols)]
        examples, seen = [], {}
        for n, (where, r) in enumerate(rows):
            text = str(r[args.input_column]).strip()
            target = str(r[args.target_column]).strip()
            if not text:
                raise DataError(f"{where}: empty `{args.input_column}`")
            label = None
            if args.kind == "classification":
                if target not in label_values:
                    raise DataError(
                        f"{where}: label {target!r} is not one of the label_words keys {label_values}"
                    )
                label = label_values.index(target)
                target = label_words[label]
            elif not target:
                raise DataError(f"{where}: empty `{args.target_column}`")
            key = str(r[args.id_column]) if args.id_column else f"{split}-{n}"
            if key in seen:  # predictions, tests and the report pair examples by id
                raise DataError(f"{where}: id {key!r} again (first at {seen[key]}); every "
                                f"`{args.id_column}` of a split must be unique")
            seen[key] = where
            examples.append(Example(key, args.template.format(text=text), target, label, text))
        return examples

    def load() -> TaskData:
        validation = read("validation", args.validation) if args.validation else None
        return TaskData(read("train", args.train), validation, read("test", args.test))

    lengths = dict(max_source_length=args.max_source_length,
                   max_target_length=args.max_target_length, max_new_tokens=args.max_new_tokens)
    if args.kind == "classification":
        return ClassificationTask(args.name, load, label_words, **lengths)
    return GenerationTask(args.name, load, **lengths)
