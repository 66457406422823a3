"""Model families: which architecture a `model:` setting names, read before the model loads.

Methods differ by family in their defaults (LoRA's targets are `q`, `v` on T5 and `q_proj`,
`v_proj` on BART) and in what they support (prefix tuning needs attention modules it knows);
both are settled at config time, so the resolved config written beside a run says what ran.

    t5    T5, Flan-T5, T5 v1.1 (model_type t5) and mT5 (mt5)
    bart  BART (bart)
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from peftlab.hub import hub_reachable
from peftlab.models import PRESETS, preset_config

FAMILIES = {"t5": "t5", "mt5": "t5", "bart": "bart"}  # model_type -> family


@functools.lru_cache(maxsize=64)
def model_type(name: str) -> str | None:
    """The `model_type` of a preset, a local folder or a hub id; None where it cannot be
    read without loading the model (a hub id offline and not cached)."""
    if name in PRESETS:
        return preset_config(name).model_type
    path = Path(name)
    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return None  # loading the model says what is wrong with the folder
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name, local_files_only=not hub_reachable()).model_type
    except Exception:  # offline and not cached, a typo: the model load reports it
        return None


def family(name: str) -> str | None:
    """`t5`, `bart`, `other` (a known model_type of no supported family), or None (unknown)."""
    kind = model_type(name)
    return None if kind is None else FAMILIES.get(kind, "other")
