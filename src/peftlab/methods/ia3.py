"""(IA)^3 (Liu et al. 2022) via peft: learned scaling vectors on keys, values and FFN inputs."""

from __future__ import annotations

from peft import IA3Config, TaskType
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from peftlab.methods.base import Method, MethodContext
from peftlab.methods.peft_common import wrap


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Flan-T5's gated feed-forward has wi_0/wi_1/wo; `wo` scales the FFN's inner activations.
    target_modules: list[str] = Field(default_factory=lambda: ["k", "v", "wo"], min_length=1)
    feedforward_modules: list[str] = Field(default_factory=lambda: ["wo"])

    @model_validator(mode="after")
    def _subset(self) -> Args:
        extra = set(self.feedforward_modules) - set(self.target_modules)
        if extra:
            raise ValueError(f"feedforward_modules {sorted(extra)} must also be target_modules")
        return self


def apply(model: nn.Module, args: Args, ctx: MethodContext, for_inference: bool) -> nn.Module:
    config = IA3Config(
        task_type=TaskType.SEQ_2_SEQ_LM, target_modules=list(args.target_modules),
        feedforward_modules=list(args.feedforward_modules),
    )
    return wrap(model, config, "method_args.target_modules")


METHOD = Method("ia3", Args, apply, default_learning_rate=3e-3, adds_parameters=True,
                summary="(IA)^3 via peft: learned scales on k, v and feed-forward activations")
