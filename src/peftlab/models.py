"""Load a seq2seq model and tokenizer: HF hub id, local folder, or a random-initialised preset.

Presets exist because no pretrained Flan-T5 weights can be downloaded in offline places (CI,
clusters without internet): they have the real architecture, with random weights drawn from a
fixed seed so every run of a study starts from the same "checkpoint", as with real weights.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    MT5Config,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    T5Config,
)

from peftlab.errors import ModelLoadError
from peftlab.hub import download_hint, hub_reachable

PRESET_INIT_SEED = 0
FLAN_T5_SMALL_TOKENIZER = "google/flan-t5-small"

# The T5 presets keep d_model != num_heads * d_kv (512 vs 384 in Flan-T5-small): several PEFT
# code paths assume they are equal and break on the real geometry.
PRESETS: dict[str, dict] = {
    "t5-tiny": dict(
        d_model=64, d_kv=8, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
    ),
    "flan-t5-small-random": dict(
        d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=8,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
    ),
    # mT5 (MT5ForConditionalGeneration) in t5-tiny's geometry
    "mt5-tiny": dict(
        d_model=64, d_kv=8, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
    ),
    # BART (BartForConditionalGeneration): learned positions, LayerNorm with biases, biased
    # projections named q_proj/k_proj/v_proj/out_proj, fc1/fc2; tied embeddings as in BART
    "bart-tiny": dict(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_position_embeddings=1024,
    ),
}
# The presets use the Flan-T5 tokenizer (the one on this machine), so every preset has its
# vocabulary and special ids: pad 0, end-of-sequence 1, decoding starts from pad.
_T5_COMMON = dict(
    vocab_size=32128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
    dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0, is_encoder_decoder=True,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    # transformers 5 ties input and output embeddings unless told otherwise; Flan-T5 and mT5
    # do not (tied: 60.5M parameters instead of Flan-T5-small's real 76,961,152).
    tie_word_embeddings=False,
)
_BART_COMMON = dict(
    vocab_size=32128, pad_token_id=0, eos_token_id=1, bos_token_id=0, decoder_start_token_id=0,
    forced_eos_token_id=None, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
)


def _untie_lm_head(model: nn.Module) -> None:
    """Give the preset its own output embedding, as Flan-T5 has.

    T5Config in transformers 5 forces `tie_word_embeddings=True` at construction, so a model
    built from a config shares `lm_head` with the input embedding (60.5M parameters instead of
    76,961,152). Real checkpoints are untied on load because both tensors are in the file.
    """
    model.config.tie_word_embeddings = False
    model.all_tied_weights_keys.pop("lm_head.weight", None)
    std = model.config.initializer_factor * 1.0  # T5's init for an untied lm_head
    model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight) * std)


def preset_config(name: str) -> PretrainedConfig:
    if name.startswith("bart"):
        return BartConfig(**_BART_COMMON, **PRESETS[name])
    return (MT5Config if name.startswith("mt5") else T5Config)(**_T5_COMMON, **PRESETS[name])


def default_tokenizer_for(model: str) -> str:
    """Presets use the real Flan-T5 tokenizer: a local copy under PEFTLAB_DATA_DIR if there."""
    if model not in PRESETS:
        return model
    data_dir = os.environ.get("PEFTLAB_DATA_DIR")
    if data_dir and (Path(data_dir) / "flan-t5-small-tokenizer").is_dir():
        return str(Path(data_dir) / "flan-t5-small-tokenizer")
    return FLAN_T5_SMALL_TOKENIZER


class _KnownHarmless(logging.Filter):
    """transformers' warning that a checkpoint holding both `shared` and `lm_head` is not
    tied: Flan-T5's real checkpoints are untied on purpose (two different tensors, 76,961,152
    parameters), and transformers 5's T5Config asks to tie them, so every load warned."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("tied weights mapping" in message and "so we will NOT tie them" in message)


def silence_known_warnings() -> None:
    """Silence what is known and harmless, and nothing else."""
    logger = logging.getLogger("transformers.modeling_utils")  # where the tie warning is logged
    if not any(isinstance(f, _KnownHarmless) for f in logger.filters):
        logger.addFilter(_KnownHarmless())
    # peft reads `is_gradient_checkpointing`, which transformers 5 deprecated: nothing a
    # user can act on, printed for every run of a study
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)


silence_known_warnings()


def _offline_hint(name: str, what: str) -> str:
    unreachable = "" if hub_reachable() else " (the Hugging Face hub cannot be reached from here)"
    return (f"could not load {what} `{name}`{unreachable}. {download_hint(name, what)} in the "
            f"config, or use a random preset for smoke tests ({', '.join(PRESETS)}).")


_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"tokenizer path `{name}` is a file; point at the folder holding it")
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"tokenizer folder `{name}` has none of {', '.join(_TOKENIZER_FILES)}; set "
            "`tokenizer:` to a folder saved with `tokenizer.save_pretrained(DIR)`"
        )
    try:
        # offline: the local cache only, at once (see peftlab.hub)
        return AutoTokenizer.from_pretrained(name, local_files_only=not path.is_dir()
                                             and not hub_reachable())
    except Exception as e:  # HF raises OSError, ValueError, HTTP errors...
        raise ModelLoadError(f"{_offline_hint(name, 'tokenizer')} ({type(e).__name__}: {e})") from e


def common_tokens(tokenizer: Any, k: int) -> list[int]:
    """The k most common ordinary tokens: by the unigram model's log-probability where the
    tokenizer has one (T5's SentencePiece), else by id (BPE ids follow merge order, roughly
    frequency). Special tokens (pad, EOS, unknown, T5's <extra_id_*> sentinels) are left out.
    peft's SAMPLE_VOCAB draws from every embedding row instead, sentinels and the 28 rows of
    Flan-T5's embedding that no token uses included."""
    special = set(tokenizer.all_special_ids)
    model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {}) \
        if hasattr(tokenizer, "backend_tokenizer") else {}
    vocab = model.get("vocab")
    if model.get("type") == "Unigram" and isinstance(vocab, list):
        ranked = sorted(range(len(vocab)), key=lambda i: -vocab[i][1])
    else:
        ranked = list(range(len(tokenizer)))
    return [i for i in ranked if i not in special][:k]


def load_model(name: str) -> nn.Module:
    """A seq2seq LM in fp32 and eval mode: a preset, a local folder with weights, or a hub id."""
    if name in PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRESET_INIT_SEED)
            config = preset_config(name)
            model = AutoModelForSeq2SeqLM.from_config(config)
            if isinstance(config, (T5Config, MT5Config)):
                _untie_lm_head(model)
        return model.eval()
    path = Path(name)
    if path.is_dir():
        weights = [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.safetensors.*")]
        if not (path / "config.json").is_file() or not weights:
            raise ModelLoadError(
                f"model folder `{name}` has no config.json and weights (*.safetensors); "
                "save one with `model.save_pretrained(DIR)` or use a preset "
                f"({', '.join(PRESETS)})"
            )
    elif path.suffix or name.startswith((".", "/")):
        raise ModelLoadError(f"model folder `{name}` does not exist")
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(
            name, dtype=torch.float32,
            local_files_only=not path.is_dir() and not hub_reachable())  # see peftlab.hub
    except Exception as e:
        raise ModelLoadError(f"{_offline_hint(name, 'model')} ({type(e).__name__}: {e})") from e
    return model.eval()


def set_dropout(model: nn.Module, rate: float) -> None:
    """Every dropout of the model at `rate`: its modules, and the probability attention layers
    keep as a float (T5's attention applies it functionally)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
        for key in ("dropout", "activation_dropout"):  # BART's layers apply both functionally
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, rate)
    for key in ("dropout_rate", "dropout", "attention_dropout", "activation_dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, rate)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
