"""Where task data comes from: a local folder in the layout of shared/data, or the HF hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peftlab.errors import DataError


def data_dir(explicit: str | None) -> Path | None:
    """`task_args.data_dir`, else $PEFTLAB_DATA_DIR, else None (use the HF hub)."""
    value = explicit or os.environ.get("PEFTLAB_DATA_DIR")
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise DataError(f"data folder not found: {path} (from task_args.data_dir or PEFTLAB_DATA_DIR)")
    return path


def load_hub_split(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """A split from the HF hub via `datasets`; offline failures say how to use local files."""
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
