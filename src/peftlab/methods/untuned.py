"""No training: the model as loaded, evaluated at step 0 (the reference every method must beat).

Flan-T5 saw SST-2 and SAMSum during instruction tuning, so this is the untuned
(instruction-tuned) model, not a zero-shot one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import nn

from peftlab.methods.base import Method, MethodContext, freeze


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


def apply(model: nn.Module, args: Args, ctx: MethodContext, for_inference: bool) -> nn.Module:
    freeze(model)
    return model


METHOD = Method("untuned", Args, apply, default_learning_rate=None, adds_parameters=False,
                summary="no training: the loaded (instruction-tuned) model at step 0")
