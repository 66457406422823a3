"""(IA)^3 (Liu et al. 2022) via peft: learned scaling vectors on keys, values and FFN inputs."""

from __future__ import annotations

from typing import Any

import torch
from peft import IA3Config, TaskType
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from peftlab.methods.base import Method, MethodContext
from peftlab.methods.peft_common import wrap
from peftlab.pack import Router, Stack, per_row


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


class RoutedIA3(nn.Module):
    """peft's (IA)^3 linear layer (the same computation: feed-forward layers scale their
    input, the others their output) with each row's member's scaling vector."""

    def __init__(self, layer: nn.Module, scale: Stack, router: Router):
        super().__init__()
        self.base_layer, self.is_feedforward = layer.base_layer, layer.is_feedforward
        self.scale, self.router = scale, router

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's: T5's feed-forward reads its dtype."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        live = self.scale.live
        if self.router.member is not None:
            scaling = live[self.router.member].flatten()
        else:
            rows = per_row(self.scale, self.router, x.shape[0])
            scaling = rows.reshape(len(rows), *([1] * (x.dim() - 2)), -1)
        if self.is_feedforward:
            return self.base_layer((x.to(live.dtype) * scaling).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scaling).to(result.dtype)


def route(model: nn.Module, stacks: dict[str, Stack], router: Router) -> None:
    for name, stack in stacks.items():
        module_name = name.removesuffix(".ia3_l.default")
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                RoutedIA3(model.get_submodule(module_name), stack, router))


METHOD = Method("ia3", Args, apply, default_learning_rate=3e-3, adds_parameters=True,
                summary="(IA)^3 via peft: learned scales on k, v and feed-forward activations",
                route=route,
                # peft's own defaults for BART: keys, values and the second feed-forward layer
                family_defaults={"bart": {"target_modules": ["k_proj", "v_proj", "fc2"],
                                          "feedforward_modules": ["fc2"]}},
                mergeable=True)
