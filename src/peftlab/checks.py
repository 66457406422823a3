"""Checks before a run allocates anything: what would fail hours later fails now, with what
to change."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from peftlab.device import available_memory
from peftlab.errors import PeftlabError
from peftlab.methods import Method
from peftlab.tasks import ClassificationTask, Task

if TYPE_CHECKING:
    from peftlab.run import Setup


def check_attention_memory(setups: list[Setup]) -> None:
    """Refuse, before allocating, a run whose training or evaluation cannot fit, so nothing
    fails after hours of training (`max_source_length: 100000` on SAMSum ended in an
    out-of-memory traceback, or on Linux the kernel killing the process with no message).
    A lower bound of the largest tensors: training, the attention scores, softmax and
    dropout mask of every encoder layer of the largest batch; evaluation, one layer's scores
    for eval_batch_size inputs, plus free generation's key/value cache over its beams and one
    step's vocabulary scores, or rank classification's vocabulary scores at every target
    position. A method's extra positions (prompt or prefix tokens) count; in a pack, every
    member's batches at once, the longest input of any member."""
    s, rows = setups[0], len(setups)
    if s.model is None:
        return
    config, cfg = s.model.config, s.cfg
    heads = getattr(config, "num_heads", None) or getattr(config, "encoder_attention_heads", 1)
    layers = getattr(config, "num_layers", None) or getattr(config, "encoder_layers", 1)
    decoder_layers = getattr(config, "num_decoder_layers", None) or getattr(
        config, "decoder_layers", None) or layers
    d_kv = getattr(config, "d_kv", None) or config.d_model // heads
    longest = max(max((len(x) for x in m.features(split).input_ids), default=0)
                  for m in setups for split in ("train", "validation", "test"))
    queries, keys = (s.method.extra_positions(s.method.Args.model_validate(cfg.method_args))
                     if isinstance(s.method, Method) else (0, 0))
    per_matrix = heads * (longest + queries) * (longest + keys) * 4 * 3
    generated = cfg.eval_batch_size * cfg.num_beams
    cache = 2 * 2 * decoder_layers * generated * heads * d_kv * 4 * (
        longest + keys + cfg.max_new_tokens)  # self and cross attention, keys and values
    vocabulary = config.vocab_size * 4 * 2  # scores and their log-softmax
    evaluation = max(cfg.eval_batch_size * per_matrix,
                     cache + generated * vocabulary,
                     cfg.eval_batch_size * cfg.max_target_length * vocabulary)
    needed = rows * max(cfg.batch_size * per_matrix * layers, evaluation)
    free = available_memory(s.device)
    if free is not None and needed > free:
        extra = f", plus {max(queries, keys):,} method tokens" if queries + keys else ""
        raise PeftlabError(
            f"the longest input is {longest:,} tokens (`max_source_length` "
            f"{cfg.max_source_length:,}{extra}): "
            f"training and evaluating it need at least {needed / 2**30:.1f} GiB (attention "
            f"scores, and evaluation's generation cache and vocabulary scores), and "
            f"{free / 2**30:.1f} GiB is free. Lower `max_source_length`, `batch_size`, "
            "`eval_batch_size`, `num_beams` or `max_new_tokens` (or the method's tokens).")


def check_label_tokens(task: Task, tokenizer: PreTrainedTokenizerBase) -> None:
    """Rank classification cannot tell apart label words that tokenize the same."""
    if not isinstance(task, ClassificationTask):
        return
    seen: dict[tuple[int, ...], str] = {}
    for word in task.label_words:
        ids = tuple(tokenizer(word)["input_ids"])
        if ids in seen:
            raise PeftlabError(f"label words {seen[ids]!r} and {word!r} are the same tokens "
                               f"{list(ids)} for this tokenizer; give each class its own word")
        seen[ids] = word
