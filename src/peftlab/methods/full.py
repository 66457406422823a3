"""Full fine-tuning: every weight trains."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import nn

from peftlab.methods.base import Method, MethodContext


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


def apply(model: nn.Module, args: Args, ctx: MethodContext, for_inference: bool) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


METHOD = Method("full", Args, apply, default_learning_rate=3e-4, adds_parameters=False,
                summary="full fine-tuning: every weight trains")
