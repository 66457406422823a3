"""LoRA (Hu et al. 2021) via peft. Defaults r=8, alpha=16 on the query and value projections
(T5's `q`, `v`; BART's `q_proj`, `v_proj`): the seed study's settings."""

from __future__ import annotations

from peft import LoraConfig, TaskType
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import Method, MethodContext
from peftlab.methods.peft_common import wrap
from peftlab.pack import routed_model


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: updates scale by alpha/r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q", "v"], min_length=1)


def _check_rank(model: nn.Module, args: Args) -> None:
    """A rank above a targeted layer's smaller side adds nothing a full update lacks, and a
    huge one allocates without end: refused before peft builds the factors."""
    sides = [min(m.in_features, m.out_features) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.split(".")[-1] in args.target_modules]
    if sides and args.r > min(sides):
        raise ConfigError(f"`method_args.r` is {args.r:,}: larger than the {min(sides):,} "
                          "features of the smallest targeted layer; a rank above it adds "
                          "nothing (full rank is reached at that size)")


def apply(model: nn.Module, args: Args, ctx: MethodContext, for_inference: bool) -> nn.Module:
    _check_rank(model, args)
    config = LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, r=args.r, lora_alpha=args.alpha,
        lora_dropout=args.dropout, target_modules=list(args.target_modules), bias="none",
    )
    return wrap(model, config, "method_args.target_modules")


METHOD = Method("lora", Args, apply, default_learning_rate=1e-3, adds_parameters=True,
                summary="LoRA via peft: low-rank updates of the target projections",
                route=routed_model,  # peft's LoRA layers, their A and B routed per row
                family_defaults={"bart": {"target_modules": ["q_proj", "v_proj"]}},
                mergeable=True)
