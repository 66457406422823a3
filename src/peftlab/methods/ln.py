"""Layer-norm tuning: only the RMS-norm scales train.

T5 has no bias terms, so this is the T5 analogue of BitFit (bias-only tuning).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import nn

from peftlab.methods.base import Method, MethodContext, freeze


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


def apply(model: nn.Module, args: Args, ctx: MethodContext, for_inference: bool) -> nn.Module:
    freeze(model)
    norms = [m for m in model.modules() if type(m).__name__.endswith("LayerNorm")]
    if not norms:
        raise ValueError("ln: the model has no LayerNorm modules")
    for m in norms:
        m.weight.requires_grad_(True)
    return model


METHOD = Method("ln", Args, apply, default_learning_rate=3e-3, adds_parameters=False,
                summary="layer-norm scales only (BitFit's analogue on T5, which has no biases)")
