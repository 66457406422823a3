"""Prompt tuning (Lester et al. 2021) via peft: N learned embeddings before the encoder input.

There is no decoder prompt: peft's seq2seq default (num_transformer_submodules=2) allocates 2N
prompt rows, but in peft 0.21 only the first N are ever used, so the decoder half trains
nothing and doubles the reported count.
"""

from __future__ import annotations

import types
from typing import Any, Literal

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from peftlab.limits import MAX_TOKENS
from peftlab.methods.base import Method, MethodContext
from peftlab.models import common_tokens, load_tokenizer
from peftlab.pack import Router, Stack, per_row


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(20, ge=1, le=MAX_TOKENS)
    init: Literal["vocab", "random", "text"] = Field(
        "vocab", description="vocab: embeddings of tokens sampled from the most common ones "
        "(Lester et al.)"
    )
    vocab_top_k: int = Field(
        5000, ge=1, description="init vocab: sample from this many most common tokens (Lester "
        "et al.: 5,000); special and sentinel tokens never"
    )
    init_text: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_decoder_prompt(cls, data: Any) -> Any:
        if isinstance(data, dict) and "decoder_prompt" in data:
            raise ValueError("`decoder_prompt` was removed: in peft 0.21 the decoder half of "
                             "the prompt never reaches the model (zero gradient), so it trained "
                             "nothing and doubled the reported parameter count")
        return data

    @model_validator(mode="after")
    def _text(self) -> Args:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs `init_text`")
        return self


def _vocab_init(model: nn.Module, args: Args, ctx: MethodContext) -> None:
    """Lester et al.: each prompt row starts as the embedding of a token drawn from the 5,000
    most common ones (with the torch generator, seeded by the run's seed)."""
    pool = torch.tensor(common_tokens(load_tokenizer(ctx.tokenizer_path), args.vocab_top_k))
    chosen = pool[torch.randint(len(pool), (args.num_virtual_tokens,))]
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(embeddings[chosen])


_INIT = {"vocab": PromptTuningInit.RANDOM, "random": PromptTuningInit.RANDOM,
         "text": PromptTuningInit.TEXT}


def apply(model: nn.Module, args: Args, ctx: MethodContext, for_inference: bool) -> nn.Module:
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=args.num_virtual_tokens,
        num_transformer_submodules=1,  # the encoder only (see the module docstring)
        # a saved state overwrites the prompt anyway: skip the text init's tokenizer load
        prompt_tuning_init=PromptTuningInit.RANDOM if for_inference else _INIT[args.init],
        prompt_tuning_init_text=args.init_text if args.init == "text" else None,
        tokenizer_name_or_path=ctx.tokenizer_path if args.init == "text" else None,
    )
    wrapped = get_peft_model(model, config)
    if args.init == "vocab" and not for_inference:
        _vocab_init(wrapped, args, ctx)
    return wrapped


def _routed_prompt(self: nn.Module, batch_size: int, task_ids: Any = None,
                   max_cache_len: Any = None) -> torch.Tensor:
    """peft's `get_prompt` with each row's member's prompt, read through the model it is bound
    to: a deep copy of the model (its bf16 evaluation copy) rebinds it to the copy's pack,
    whose stacks and router are the copy's. A closure kept the original's, so the copy read
    the fp32 prompt and an idle router."""
    pack = self.peftlab_pack
    (stack,) = pack.stacks.values()
    return per_row(stack, pack.router, batch_size)


def route(model: nn.Module, stacks: dict[str, Stack], router: Router) -> None:
    """Each row's member's prompt. peft builds the batch's prompts in `get_prompt` (one row
    repeated: `prompts.repeat(batch_size, 1, 1)`); here each row gets its member's, and peft's
    forward puts them before the input and extends the mask as before."""
    model.get_prompt = types.MethodType(_routed_prompt, model)


METHOD = Method("prompt", Args, apply, default_learning_rate=0.3, adds_parameters=True,
                summary="prompt tuning (Lester et al.): learned embeddings before the encoder input",
                route=route,
                extra_positions=lambda args: (args.num_virtual_tokens, args.num_virtual_tokens))
