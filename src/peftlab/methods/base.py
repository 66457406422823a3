"""The one small interface every adaptation method implements.

A method takes a loaded model and its validated settings, marks what trains (and adds
whatever it adds), and can export exactly what was trained in its inference-time form:
`export_state` is what is saved (safetensors), counted as the trainable parameters, and
loaded back by `load_state`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel
from torch import nn

from peftlab.errors import ConfigError, PeftlabError, did_you_mean
from peftlab.families import model_type


@dataclass(frozen=True)
class MethodContext:
    """What a method may need besides the model: the tokenizer folder, the step budget."""

    tokenizer_path: str
    max_steps: int


def trainable_state(model: nn.Module, member: int = 0) -> dict[str, torch.Tensor]:
    """The default export: every tensor that trains (shared tensors once); in a packed model
    (peftlab.pack) the given member's."""
    pack = getattr(model, "peftlab_pack", None)
    if pack is not None:
        return dict(pack.parameters(member))
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_named_state(model: nn.Module, state: dict[str, torch.Tensor], member: int = 0) -> None:
    """Copy saved tensors into the model's parameters of the same names (a packed model's:
    the member's), checking shapes."""
    pack = getattr(model, "peftlab_pack", None)
    params = dict(pack.parameters(member)) if pack is not None and pack.stacks \
        else dict(model.named_parameters())
    for name, tensor in state.items():
        if name not in params:
            raise PeftlabError(
                f"checkpoint tensor `{name}` has no parameter of that name in the model: "
                "the checkpoint belongs to another method, model or setting"
            )
        if params[name].shape != tensor.shape:
            raise PeftlabError(
                f"checkpoint tensor `{name}` has shape {tuple(tensor.shape)}, the model's "
                f"parameter has {tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(tensor)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


@dataclass(frozen=True)
class Method:
    """One adaptation method. `apply(model, args, ctx, for_inference)` returns the model to use
    (possibly a wrapper); `for_inference=True` builds the form a saved state loads into."""

    name: str
    Args: type[BaseModel]
    apply: Callable[[nn.Module, BaseModel, MethodContext, bool], nn.Module]
    default_learning_rate: float | None
    adds_parameters: bool  # False: it trains existing weights (full, ln)
    summary: str
    export_state: Callable[..., dict[str, torch.Tensor]] = trainable_state  # (model, member=0)
    load_state: Callable[..., None] = load_named_state  # (model, state, member=0)
    on_step: Callable[[nn.Module, int], None] = field(default=lambda model, step: None)
    # How the method's trainable modules read every member's tensors in a pack (peftlab.pack):
    # route(model, stacks, router). None: the method cannot be packed (full fine-tuning shares
    # nothing; other peft adapters have no routed form here).
    route: Callable[[nn.Module, dict, object], None] | None = None
    # Model families (peftlab.families) whose defaults differ from `Args`'s (T5's): family ->
    # {setting: default}, applied at config time under what the config sets.
    family_defaults: dict[str, dict] = field(default_factory=dict)
    # The families the method supports; None: any model its code (peft's) supports.
    families: tuple[str, ...] | None = None
    # Positions the method adds to the attention of every input: (queries, keys) per args
    # (prompt tuning's tokens join the input; prefix tuning's only the keys): the memory check
    # before training counts them.
    extra_positions: Callable[[BaseModel], tuple[int, int]] = field(
        default=lambda args: (0, 0))
    # `peftlab export --merge` can fold what it trained into the base weights (a full model
    # folder); methods that add tensors the base model has no place for cannot
    mergeable: bool = False

    @property
    def trains(self) -> bool:
        return self.default_learning_rate is not None

    @property
    def uses_training_sample(self) -> bool:
        """Does a run's result depend on its training sample (a study spans train sizes and
        seeds for it)?"""
        return self.trains

    def defaults_for(self, family: str | None) -> dict:
        """The settings a config leaves out, on a model of this family."""
        return dict(self.family_defaults.get(family, {})) if family else {}

    def check_family(self, family: str | None, model: str) -> None:
        """A clear error where the method cannot adapt this family's models."""
        if self.families is not None and family is not None and family not in self.families:
            raise ConfigError(
                f"`method`: {self.name} supports {' and '.join(self.families)} models; `model` "
                f"{model} is a {model_type(model)} model (peftlab.families lists the families)"
            )


@dataclass(frozen=True)
class Baseline:
    """A model-free reference (majority class, lead-3): predictions from the data alone."""

    name: str
    Args: type[BaseModel]
    task_kind: str
    predict: Callable[[list, list], list[str]]  # (train examples, eval examples) -> outputs
    summary: str
    default_learning_rate: None = None
    trains: bool = False
    uses_training_sample: bool = False  # majority: its label is the sample's most frequent


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def check_targets(names: Iterable[str], targets: Iterable[str] | str | None, field_name: str) -> None:
    """Every target must match at least one module, with peft's matching rule.

    peft only fails when *no* target matches, so `["q", "wi"]` on Flan-T5 (whose gated
    feed-forward is `wi_0`/`wi_1`) would silently adapt `q` alone.
    """
    names = list(names)
    if targets is None:
        return
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise ConfigError(f"`{field_name}`: regex {targets!r} matches no module of the model")
        return
    parents = {n.rsplit(".", 1)[0] for n in names if "." in n}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n not in parents})
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ConfigError(
                f"`{field_name}`: `{t}` matches no module of the model{did_you_mean(t, leaves)}; "
                f"module names end with: {', '.join(x for x in leaves if not x.isdigit())}"
            )
