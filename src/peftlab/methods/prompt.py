"""Prompt tuning (Lester et al. 2021) via peft: N learned embeddings before the encoder input.

peft's seq2seq default (num_transformer_submodules=2) also prepends N embeddings to the
decoder input, which is not Lester's method: here that is the `decoder_prompt` option.
"""

from __future__ import annotations

from typing import Literal

from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from peftlab.methods.base import Method, MethodContext


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(20, ge=1)
    init: Literal["vocab", "random", "text"] = Field(
        "vocab", description="vocab: embeddings of sampled vocabulary tokens (Lester's advice)"
    )
    init_text: str | None = None
    decoder_prompt: bool = Field(False, description="also prepend to the decoder (peft default)")

    @model_validator(mode="after")
    def _text(self) -> Args:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs `init_text`")
        return self


_INIT = {"vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM,
         "text": PromptTuningInit.TEXT}


def apply(model: nn.Module, args: Args, ctx: MethodContext, for_inference: bool) -> nn.Module:
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=args.num_virtual_tokens,
        num_transformer_submodules=2 if args.decoder_prompt else 1,
        # a saved state overwrites the prompt anyway: skip the text init's tokenizer load
        prompt_tuning_init=PromptTuningInit.RANDOM if for_inference else _INIT[args.init],
        prompt_tuning_init_text=args.init_text if args.init == "text" else None,
        tokenizer_name_or_path=ctx.tokenizer_path if args.init == "text" else None,
    )
    return get_peft_model(model, config)


METHOD = Method("prompt", Args, apply, default_learning_rate=0.3, adds_parameters=True,
                summary="prompt tuning (Lester et al.): learned embeddings before the encoder input")
