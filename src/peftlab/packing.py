"""Which runs may train in one pack (peftlab.pack): the rule the study runner groups its
cells by, and `run_pack` checks."""

from __future__ import annotations

import json

from peftlab.config import RunConfig
from peftlab.families import family
from peftlab.methods import Baseline, get_method

# What the members of a pack may differ in (peftlab.pack): everything else is one model, one
# method and size, one schedule shape (steps, batches, evaluations) for all of them. Each
# member reads its own training sample (its seed's draw of its train_size) and keeps its own
# batch order; validation and test are drawn apart from both (checked in setup_pack).
PACK_FREE_KEYS = ("seed", "learning_rate", "train_size", "output_dir")


def pack_key(cfg: RunConfig) -> str:
    """Runs with equal keys can train in one pack."""
    return json.dumps({k: v for k, v in cfg.model_dump(mode="json").items()
                       if k not in PACK_FREE_KEYS}, sort_keys=True)


def unpackable_because(cfg: RunConfig) -> str | None:
    """Why this run cannot train in a pack with others; None where it can."""
    method = get_method(cfg.method)
    if isinstance(method, Baseline) or not method.trains:
        return f"method `{method.name}` does not train"
    if method.route is None:
        return f"method `{method.name}` has no routed form (peftlab.pack)"
    if family(cfg.model) == "bart" and cfg.dropout != 0:
        # BART applies its dropout with torch's global generator inside its layers, where a
        # member's own masks (peftlab.dropout) cannot reach: members would not be their runs
        return "BART's dropout is drawn inside its layers, not per member: set `dropout: 0`"
    return None


def packable(cfg: RunConfig) -> bool:
    """Can this run train in a pack with others?"""
    return unpackable_because(cfg) is None
