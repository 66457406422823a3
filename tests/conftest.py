"""Shared fixtures: the real data (PEFTLAB_DATA_DIR, default ../shared/data) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_default = ROOT.parent / "shared" / "data"
if not os.environ.get("PEFTLAB_DATA_DIR") and _default.is_dir():
    os.environ["PEFTLAB_DATA_DIR"] = str(_default)
DATA_DIR = Path(os.environ.get("PEFTLAB_DATA_DIR", _default)).resolve()
os.environ["PEFTLAB_DATA_DIR"] = str(DATA_DIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENIZER_DIR = DATA_DIR / "flan-t5-small-tokenizer"

if not (DATA_DIR / "sst2" / "train.tsv").is_file():
    raise RuntimeError(
        f"the tests need the real data: set PEFTLAB_DATA_DIR (looked in {DATA_DIR})"
    )


@pytest.fixture(scope="session")
def tokenizer():
    from peftlab.models import load_tokenizer

    return load_tokenizer(str(TOKENIZER_DIR))


def tiny_run_sets(tmp_path: Path, **overrides) -> list[str]:
    """--set items for a fast run on t5-tiny."""
    values = dict(model="t5-tiny", task="sst2", method="lora", train_size=16, val_size=16,
                  test_size=24, max_steps=4, eval_every=2, log_every=2, batch_size=4,
                  eval_batch_size=16, output_dir=str(tmp_path / "run"))
    values.update(overrides)
    return [f"{k}={v}" for k, v in values.items()]


def cli_train(tmp_path: Path, name: str = "run", **overrides) -> tuple[dict, Path]:
    """`peftlab train --quiet` of a tiny run (`tiny_run_sets`) into tmp_path/name: its summary
    and folder."""
    import json

    from typer.testing import CliRunner

    from peftlab.cli import app

    sets = tiny_run_sets(tmp_path, output_dir=str(tmp_path / name), **overrides)
    result = CliRunner().invoke(app, ["train", "--quiet"] + [x for s in sets for x in ("--set", s)])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / name / "summary.json").read_text()), tmp_path / name
