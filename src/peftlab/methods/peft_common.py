"""Wrapping a model with a peft config, with the target-module check peft leaves out."""

from __future__ import annotations

from peft import PeftConfig, get_peft_model
from torch import nn

from peftlab.methods.base import check_targets, module_names


def wrap(model: nn.Module, config: PeftConfig, field_name: str) -> nn.Module:
    names = module_names(model)
    check_targets(names, getattr(config, "target_modules", None), field_name)
    peft_model = get_peft_model(model, config)
    # peft fills model-specific defaults for target_modules: check what it resolved too.
    resolved = getattr(peft_model.peft_config["default"], "target_modules", None)
    check_targets(names, sorted(resolved) if isinstance(resolved, set) else resolved, field_name)
    return peft_model
