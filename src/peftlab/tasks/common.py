"""Where task data comes from: a local folder in the layout of shared/data, or the HF hub."""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from peftlab.errors import DataError
from peftlab.hub import hub_reachable, offline_by_setting


def data_dir(explicit: str | None) -> Path | None:
    """`task_args.data_dir`, else $PEFTLAB_DATA_DIR, else None (use the HF hub)."""
    value = explicit or os.environ.get("PEFTLAB_DATA_DIR")
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise DataError(f"data folder not found: {path} (from task_args.data_dir or PEFTLAB_DATA_DIR)")
    return path


def absolute_data_dir(args: Any) -> Any:
    """The data folder a run reads, made absolute and written into its config: the
    explicit `data_dir`, else $PEFTLAB_DATA_DIR as this process sees it (a Ray worker or a
    later `peftlab eval` may not), else None (the HF hub)."""
    value = args.data_dir or os.environ.get("PEFTLAB_DATA_DIR")
    return args.model_copy(update={"data_dir": os.path.abspath(value) if value else None})


def load_hub_split(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """A split from the HF hub via `datasets`; offline failures say how to use local files."""
    if not offline_by_setting() and not hub_reachable():
        # at once, not after datasets' retries (HF_HUB_OFFLINE=1 reads a cached copy)
        raise DataError(
            f"`{dataset}` split `{split}`: the Hugging Face hub cannot be reached from here. "
            "Set PEFTLAB_DATA_DIR (or task_args.data_dir) to a folder with "
            "sst2/{train,dev}.tsv and samsum/{train,validation,test}.jsonl, or HF_HUB_OFFLINE=1 "
            "to read a copy `datasets` cached earlier.")
    try:
        import datasets

        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:
        raise DataError(
            f"could not load `{dataset}` split `{split}` from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Offline, set PEFTLAB_DATA_DIR (or task_args.data_dir) "
            "to a folder with sst2/{train,dev}.tsv and samsum/{train,validation,test}.jsonl."
        ) from e
    return [dict(row) for row in ds]


def check_template(template: str) -> str:
    """A prompt template holds the example's input as `{text}` and nothing else to fill in.

    Checked before anything runs: `str.format` would raise KeyError mid-run on `{review}`,
    silently train on one constant input without `{text}`, and allow attribute access
    (`{text.__class__}`). Once checked, `template.format(text=...)` can do none of that.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    fields = [(name, spec, conversion) for _, name, spec, conversion in parsed if name is not None]
    for name, spec, conversion in fields:
        if name != "text" or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"unknown field {shown}: a template has one field, {{text}} (the "
                             "example's input); write literal braces as {{ and }}")
    if not fields:
        raise ValueError("no {text} field: every example would get the same input")
    return template


Template = Annotated[str, AfterValidator(check_template)]
