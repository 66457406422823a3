"""Layer-norm tuning: only the normalisation layers' parameters train.

T5 (RMS norms with a scale, no biases anywhere) trains every norm's scale: the T5 analogue of
BitFit (bias-only tuning). BART's LayerNorms train their scales and biases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from peftlab.methods.base import Method, MethodContext, freeze
from peftlab.pack import Router, Stack, per_row


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


def norms(model: nn.Module) -> list[nn.Module]:
    """T5's RMS norms (T5LayerNorm, MT5LayerNorm) and torch LayerNorms (BART's)."""
    return [m for m in model.modules() if type(m).__name__.endswith("LayerNorm")]


def apply(model: nn.Module, args: Args, ctx: MethodContext, for_inference: bool) -> nn.Module:
    freeze(model)
    found = norms(model)
    if not found:
        raise ValueError("ln: the model has no LayerNorm modules")
    for m in found:
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
    return model


def _rows(stack: Stack, router: Router, like: torch.Tensor) -> torch.Tensor:
    """Each row's member's vector, shaped to broadcast over `like` (batch, ..., features)."""
    rows = per_row(stack, router, like.shape[0])
    return rows.view(len(rows), *([1] * (like.dim() - 2)), -1)


class RoutedLayerNorm(nn.Module):
    """A norm with each row's member's parameters: T5's RMS norm (transformers' T5LayerNorm,
    the same computation), or torch's LayerNorm (its scale and bias)."""

    def __init__(self, norm: nn.Module, weight: Stack, bias: Stack | None, router: Router):
        super().__init__()
        self.rms = not isinstance(norm, nn.LayerNorm)
        if self.rms and not hasattr(norm, "variance_epsilon"):
            raise TypeError(f"ln: no routed form for {type(norm).__name__}")
        self.eps = norm.variance_epsilon if self.rms else norm.eps
        self.weight_stack, self.bias_stack, self.router = weight, bias, router

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight, m = self.weight_stack.live, self.router.member
        bias = None if self.bias_stack is None else self.bias_stack.live
        if not self.rms:
            if m is not None:  # exactly nn.LayerNorm's computation
                return F.layer_norm(hidden_states, weight.shape[1:], weight[m],
                                    None if bias is None else bias[m], self.eps)
            out = F.layer_norm(hidden_states, weight.shape[1:], None, None, self.eps)
            out = out * _rows(self.weight_stack, self.router, out)
            return out if bias is None else out + _rows(self.bias_stack, self.router, out)
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        if weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(weight.dtype)
        if m is not None:
            return weight[m] * hidden_states
        return _rows(self.weight_stack, self.router, hidden_states) * hidden_states


def route(model: nn.Module, stacks: dict[str, Stack], router: Router) -> None:
    for module_name in dict.fromkeys(name.rpartition(".")[0] for name in stacks):
        parent, _, child = module_name.rpartition(".")
        norm = model.get_submodule(module_name)
        setattr(model.get_submodule(parent) if parent else model, child,
                RoutedLayerNorm(norm, stacks[f"{module_name}.weight"],
                                stacks.get(f"{module_name}.bias"), router))


METHOD = Method("ln", Args, apply, default_learning_rate=3e-3, adds_parameters=False,
                summary="layer-norm parameters only (on T5 its RMS-norm scales: BitFit's analogue "
                "on a model with no biases)",
                route=route, mergeable=True)
