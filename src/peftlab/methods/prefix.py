"""Prefix tuning (Li & Liang 2021) for T5 and BART encoder-decoders, written here.

Why not peft: in peft 0.21 a T5 model's prefixes reach only the decoder self-attention (they
travel as a KV cache, which the encoder and cross-attention never read), and the default
PrefixTuningConfig crashes when d_model != num_heads * d_kv, as in Flan-T5-small. Li & Liang
put learned key/value prefixes in every attention: encoder self-attention, decoder
self-attention and decoder cross-attention. That is what this module does.

How: a custom attention function (transformers' AttentionInterface) prepends each attention
module's prefix keys and values right before the scores are computed, after any KV-cache
update, so the cache holds only real tokens and generation with a cache stays correct. The
prefix positions get no relative-position bias (T5) and are never masked. T5's and BART's
attention modules differ only in names (`q`/`q_proj`, `n_heads`/`num_heads`), read below.

Training can use Li & Liang's MLP reparameterisation (a small embedding through a 2-layer
tanh MLP); `export_state` folds it into plain prefixes, which is what is saved, counted and
used at inference.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from peftlab.dropout import attention_forward
from peftlab.limits import MAX_TOKENS
from peftlab.methods.base import Method, MethodContext, freeze, load_named_state
from peftlab.models import common_tokens, load_tokenizer
from peftlab.pack import Router, Stack, routed_model

ATTN_NAME = "peftlab_prefix"
KINDS = ("encoder", "decoder_self", "decoder_cross")


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_prefix_tokens: int = Field(20, ge=1, le=MAX_TOKENS)
    reparameterize: bool = Field(True, description="Li & Liang's MLP during training")
    hidden_size: int = Field(512, ge=1, description="MLP hidden width")
    init: Literal["random", "vocab"] = Field(
        "random", description="vocab: activations of sampled real tokens (plain prefixes only)"
    )
    kinds: list[Literal["encoder", "decoder_self", "decoder_cross"]] = Field(
        default_factory=lambda: list(KINDS), min_length=1, description="which attentions"
    )

    @model_validator(mode="after")
    def _init_needs_plain(self) -> Args:
        if self.init == "vocab" and self.reparameterize:
            raise ValueError("init: vocab sets plain prefixes; use it with reparameterize: false")
        return self


def prefixed_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager T5 attention (with each member's dropout: peftlab.dropout) with the module's
    prefix keys/values (if any) in front."""
    prefix = getattr(module, "peftlab_prefix", None)
    if prefix is not None:
        pk, pv = prefix(query.shape[0])  # (batch, heads, N, d_kv) each: each row's member's
        n = pk.shape[2]
        key = torch.cat([pk.to(key.dtype), key], dim=2)
        value = torch.cat([pv.to(value.dtype), value], dim=2)
        if attention_mask is not None:
            pad = attention_mask.new_zeros((*attention_mask.shape[:-1], n))
            if attention_mask.dtype == torch.bool:
                pad = pad.logical_not()
            attention_mask = torch.cat([pad, attention_mask], dim=-1)
        bias = kwargs.get("position_bias")
        if bias is not None:
            kwargs["position_bias"] = torch.cat([bias.new_zeros((*bias.shape[:-1], n)), bias], -1)
    return attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_NAME, prefixed_attention)
# Eager-style masks: always explicit float masks, never "None means causal" as with sdpa.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


# An attention module by family: its key and value projections and head count attributes.
_T5_STYLE = ("k", "v", "n_heads", "key_value_proj_dim")
_BART_STYLE = ("k_proj", "v_proj", "num_heads", "head_dim")
_CROSS = ("EncDecAttention", "encoder_attn")  # T5's, BART's decoder cross-attention


def _style(module: nn.Module) -> tuple[str, ...] | None:
    for style in (_T5_STYLE, _BART_STYLE):
        if all(hasattr(module, a) for a in style) and "Attention" in type(module).__name__:
            return style
    return None


def attention_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Every attention module of the model by kind, in layer order: T5's (T5, mT5) and
    BART's."""
    out: dict[str, list[nn.Module]] = {k: [] for k in KINDS}
    for stack, kind in ((model.get_encoder(), "encoder"), (model.get_decoder(), "decoder")):
        for name, module in stack.named_modules():
            if _style(module) is None:
                continue
            if kind == "encoder":
                out["encoder"].append(module)
            else:
                out["decoder_cross" if name.endswith(_CROSS) else "decoder_self"].append(module)
    return out


def geometry(attn: nn.Module) -> tuple[int, int]:
    """(heads, key/value width per head)."""
    style = _style(attn)
    return getattr(attn, style[2]), getattr(attn, style[3])


def key_value_projections(attn: nn.Module) -> tuple[nn.Module, nn.Module]:
    style = _style(attn)
    return getattr(attn, style[0]), getattr(attn, style[1])


class PrefixStore(nn.Module):
    """The prefixes of every attention: plain tensors, or an embedding + MLP per kind."""

    def __init__(self, layers: dict[str, int], heads: int, d_kv: int, d_model: int,
                 args: Args, plain: bool):
        super().__init__()
        self.layers, self.heads, self.d_kv, self.n = layers, heads, d_kv, args.num_prefix_tokens
        self.plain = plain
        self._current: dict[str, torch.Tensor] = {}
        self._step: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        # in a pack (peftlab.pack), every member's tensors: name -> Stack, and the router
        self.stacks: dict | None = None
        self.router: Router | None = None
        if plain:
            self.prefixes = nn.ParameterDict({
                k: nn.Parameter(torch.randn(self._shape(k)) * 0.5) for k in layers
            })
        else:
            width = 2 * heads * d_kv
            self.embeddings = nn.ParameterDict({
                k: nn.Parameter(torch.randn(self.n, d_model)) for k in layers
            })
            self.mlps = nn.ModuleDict({
                k: nn.Sequential(nn.Linear(d_model, args.hidden_size), nn.Tanh(),
                                 nn.Linear(args.hidden_size, layers[k] * width))
                for k in layers
            })

    def _shape(self, kind: str) -> tuple[int, ...]:
        return (self.layers[kind], 2, self.heads, self.n, self.d_kv)

    def _tensor(self, name: str) -> torch.Tensor:
        """A trainable tensor with a leading member dimension: every member's, or the one
        member's the router names (1 outside a pack)."""
        if self.stacks is not None:
            live, member = self.stacks[name].live, self.router.member
            return live if member is None else live[member:member + 1]
        kind = name.split(".")[1]
        return (self.prefixes if name.startswith("prefixes.") else self.embeddings)[kind][None]

    def compute(self, kind: str) -> torch.Tensor:
        """(members, layers, 2, heads, N, d_kv) for one kind; one member outside a pack."""
        if self.plain:
            return self._tensor(f"prefixes.{kind}")
        embeddings = self._tensor(f"embeddings.{kind}")  # (members, N, d_model)
        members = len(embeddings)
        routing = self.router.each_member() if self.router is not None else contextlib.nullcontext()
        with routing:  # each member's MLP on its own embedding
            out = self.mlps[kind](embeddings)  # (members, N, layers * 2 * heads * d_kv)
        return out.view(members, self.n, self.layers[kind], 2, self.heads, self.d_kv) \
            .permute(0, 2, 3, 4, 1, 5)

    def refresh(self, kinds: tuple[str, ...]) -> None:
        # Computed once per stack forward, not once per attention module; inside a training
        # step, once per step (see `begin_training_step`).
        for k in kinds:
            if k not in self.layers:
                continue
            if self._step is None or self.plain:
                self._current[k] = self.compute(k)
                continue
            if k not in self._step:
                full = self.compute(k)
                self._step[k] = (full, full.detach().requires_grad_(full.requires_grad))
            self._current[k] = self._step[k][1]

    def begin_training_step(self) -> None:
        """From now until `end_training_step`, the MLP's prefixes are computed once, and every
        forward of the step (a pack's chunks, micro-batches) reads them as a leaf: the MLP
        ran once per chunk for every member of a pack (P x 1.2 GFLOP a chunk, forward and
        backward, on the Flan-T5-small geometry), where its members alone run it once."""
        self._step = {}

    def end_training_step(self, backward: bool = True) -> None:
        """The prefixes' gradients, collected over the step, through the MLP at once (none
        where the step failed)."""
        step, self._step = self._step, None
        pairs = [(full, leaf.grad) for full, leaf in (step or {}).values()
                 if backward and leaf.grad is not None]
        if pairs:
            torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])

    def __getstate__(self) -> dict:
        # What refresh computed is per-forward (non-leaf tensors while training), not state:
        # leave it out of copies (copy.deepcopy refuses non-leaf tensors).
        return {**self.__dict__, "_current": {}, "_step": None}

    # Forward pre-hooks of the encoder and decoder stacks. Bound methods, not lambdas: a
    # deep copy of the model (bf16 evaluation) must call its own store, and copy.deepcopy
    # rebinds methods but shares closures.
    def refresh_encoder(self, module: nn.Module, args: tuple) -> None:
        self.refresh(("encoder",))

    def refresh_decoder(self, module: nn.Module, args: tuple) -> None:
        self.refresh(("decoder_self", "decoder_cross"))

    def get(self, kind: str, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each of `batch` rows' prefix keys and values for one attention module."""
        kv = self._current[kind][:, layer]  # (members, 2, heads, N, d_kv)
        if len(kv) == 1:
            kv = kv[0].unsqueeze(1).expand(2, batch, -1, -1, -1)
        else:
            kv = self.router.take(kv, batch).transpose(0, 1)
        return kv[0], kv[1]

    def make_plain(self) -> None:
        """Drop the MLP: from now on the (folded) prefixes are plain tensors (parameters; in a
        pack, stacks that replace the embedding and MLP ones in the pack's)."""
        if self.plain:
            return
        with torch.no_grad():
            if self.router is not None and self.router.only is not None:
                raise RuntimeError("make_plain folds every member: not inside one's evaluation")
            folded = {k: self.compute(k).detach().clone() for k in self.layers}
        del self.embeddings, self.mlps
        if self.stacks is not None:
            for name in [n for n in self.pack_stacks if n.startswith("peftlab_prefix.")]:
                del self.pack_stacks[name]
            self.stacks = {f"prefixes.{k}": Stack(list(v)) for k, v in folded.items()}
            self.pack_stacks.update({f"peftlab_prefix.{n}": v for n, v in self.stacks.items()})
        else:
            self.prefixes = nn.ParameterDict({k: nn.Parameter(v[0]) for k, v in folded.items()})
        self.plain = True

    def folded(self, member: int = 0) -> dict[str, torch.Tensor]:
        one = self.router.evaluating(member) if self.router is not None else contextlib.nullcontext()
        with torch.no_grad(), one:
            return {f"peftlab_prefix.prefixes.{k}": self.compute(k)[0].detach().clone()
                    for k in self.layers}


def _vocab_init(model: nn.Module, store: PrefixStore, modules: dict[str, list],
                ctx: MethodContext) -> None:
    """Li & Liang: initialise with the activations of real words (here: tokens sampled from
    the 5,000 most common, as prompt tuning's vocab init does)."""
    pool = torch.tensor(common_tokens(load_tokenizer(ctx.tokenizer_path), 5000))
    tokens = pool[torch.randint(len(pool), (1, store.n))]
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for kind in store.layers:
        for attn in modules[kind]:
            for proj in key_value_projections(attn):
                hooks.append(proj.register_forward_hook(
                    lambda m, i, o: captured.__setitem__(id(m), o.detach())))
    with torch.no_grad():
        model(input_ids=tokens, decoder_input_ids=tokens)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for kind in store.layers:
            for layer, attn in enumerate(modules[kind]):
                for j, proj in enumerate(key_value_projections(attn)):
                    act = captured[id(proj)][0]  # (N, heads * d_kv)
                    store.prefixes[kind][layer, j] = act.view(store.n, store.heads, store.d_kv) \
                        .transpose(0, 1)


def apply(model: nn.Module, args: Args, ctx: MethodContext, for_inference: bool) -> nn.Module:
    if not hasattr(model, "get_encoder") or not hasattr(model, "get_decoder"):
        raise ValueError("prefix: needs an encoder-decoder model (T5, mT5, BART)")
    freeze(model)
    modules = {k: v for k, v in attention_modules(model).items() if k in args.kinds and v}
    if not modules:
        raise ValueError("prefix: the model has no T5 or BART attention modules")
    heads, d_kv = geometry(next(iter(modules.values()))[0])
    store = PrefixStore(
        {k: len(v) for k, v in modules.items()}, heads, d_kv,
        model.config.d_model, args, plain=for_inference or not args.reparameterize,
    )
    if args.init == "vocab" and not for_inference:
        _vocab_init(model, store, modules, ctx)
    model.peftlab_prefix = store  # a submodule: its parameters train and save with the model
    for kind, attns in modules.items():
        for layer, attn in enumerate(attns):
            attn.peftlab_prefix = functools.partial(store.get, kind, layer)
    model.get_encoder().register_forward_pre_hook(store.refresh_encoder)
    model.get_decoder().register_forward_pre_hook(store.refresh_decoder)
    model.set_attn_implementation(ATTN_NAME)
    return model


def export_state(model: nn.Module, member: int = 0) -> dict[str, torch.Tensor]:
    return model.peftlab_prefix.folded(member)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], member: int = 0) -> None:
    """Saved prefixes are folded: a model still carrying its training MLP drops it first."""
    model.peftlab_prefix.make_plain()
    load_named_state(model, state, member)


def route(model: nn.Module, stacks: dict[str, Stack], router: Router) -> None:
    """The store reads every member's prefixes (or embeddings and MLP) from the stacks."""
    store = model.peftlab_prefix
    routed_model(model, {k: v for k, v in stacks.items() if ".mlps." in k}, router)
    store.stacks = {k.removeprefix("peftlab_prefix."): v for k, v in stacks.items()
                    if ".mlps." not in k}
    store.router, store.pack_stacks = router, stacks


METHOD = Method("prefix", Args, apply, default_learning_rate=5e-3, adds_parameters=True,
                summary="prefix tuning (Li & Liang): learned key/value prefixes in every attention",
                export_state=export_state, load_state=load_state, route=route,
                families=("t5", "bart"),
                extra_positions=lambda args: (0, args.num_prefix_tokens))
