"""Any other peft method by its config name and arguments (AdaLoRA, DoRA, LoHa, VeRA, ...)."""

from __future__ import annotations

from typing import Any

from peft import PeftType, TaskType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from peftlab.errors import ConfigError, did_you_mean
from peftlab.methods.base import Method, MethodContext
from peftlab.methods.peft_common import wrap


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peft_type: str = Field("LORA", description="peft's name: LORA, ADALORA, LOHA, VERA, ...")
    config: dict[str, Any] = Field(default_factory=dict, description="the peft config's fields")

    @field_validator("peft_type")
    @classmethod
    def _known(cls, v: str) -> str:
        v = v.upper()
        if v not in PEFT_TYPE_TO_CONFIG_MAPPING:
            names = sorted(str(k) for k in PEFT_TYPE_TO_CONFIG_MAPPING)
            raise ValueError(f"unknown peft type {v!r}{did_you_mean(v, names)}")
        return v


def apply(model: nn.Module, args: Args, ctx: MethodContext, for_inference: bool) -> nn.Module:
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[args.peft_type]
    kwargs = dict(args.config)
    if args.peft_type == "ADALORA":
        kwargs.setdefault("total_step", max(ctx.max_steps, 1))
    try:
        config = config_cls(task_type=TaskType.SEQ_2_SEQ_LM, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"`method_args.config` for {args.peft_type}: {e}") from None
    if config.is_prompt_learning:
        raise ConfigError("method `peft` takes adapter methods; use `prompt` or `prefix`")
    return wrap(model, config, "method_args.config.target_modules")


def on_step(model: nn.Module, step: int) -> None:
    # AdaLoRA reallocates its rank budget after each optimizer step.
    if getattr(model, "peft_type", None) == PeftType.ADALORA:
        model.base_model.update_and_allocate(step)


METHOD = Method("peft", Args, apply, default_learning_rate=1e-3, adds_parameters=True,
                summary="any peft adapter by name (ADALORA, LOHA, VERA, LORA+use_dora, ...)",
                on_step=on_step)
