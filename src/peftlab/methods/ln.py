"""Layer-norm tuning: only the RMS-norm scales train.

T5 has no bias terms, so this is the T5 analogue of BitFit (bias-only tuning).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from peftlab.methods.base import Method, MethodContext, freeze
from peftlab.pack import Router, Stack, per_row


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


class RoutedLayerNorm(nn.Module):
    """T5's RMS norm (transformers' T5LayerNorm, the same computation) with each row's
    member's scale."""

    def __init__(self, norm: nn.Module, weight: Stack, router: Router):
        super().__init__()
        self.eps, self.weight_stack, self.router = norm.variance_epsilon, weight, router

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        weight = self.weight_stack.live
        if weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(weight.dtype)
        if self.router.member is not None:
            return weight[self.router.member] * hidden_states
        rows = per_row(self.weight_stack, self.router, hidden_states.shape[0])
        return rows.view(len(rows), *([1] * (hidden_states.dim() - 2)), -1) * hidden_states


def route(model: nn.Module, stacks: dict[str, Stack], router: Router) -> None:
    for name, stack in stacks.items():
        module_name = name.removesuffix(".weight")
        parent, _, child = module_name.rpartition(".")
        norm = model.get_submodule(module_name)
        setattr(model.get_submodule(parent) if parent else model, child,
                RoutedLayerNorm(norm, stack, router))


METHOD = Method("ln", Args, apply, default_learning_rate=3e-3, adds_parameters=False,
                summary="layer-norm scales only (BitFit's analogue on T5, which has no biases)",
                route=route)
