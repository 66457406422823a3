"""Dropout while training: each run's masks from its own generator, at its own shape.

Why not `nn.Dropout`: in a pack (peftlab.pack) the rows of several runs go through one
forward. One mask drawn for the whole batch from torch's global generator would give each run
masks that depend on the runs packed with it (how many, how long their batches are), so a
run's result would depend on how it was scheduled. Here each member draws its masks from its
own generator (seeded from its seed), for the shape its rows have when it trains alone (its
own padded lengths), padded to the batch's lengths: a member draws exactly what it draws
alone, whatever it is packed with. A run alone is a pack of one and draws the same way.

Masks come from `torch.rand`, not `bernoulli_`: on CPU `bernoulli_` draws a double per element
(two 32-bit draws of torch's Mersenne twister, on one thread) where `torch.rand` draws a float.
Keeping an element when its uniform draw is at least `p` is the same Bernoulli distribution (p
on the float grid of 2^-24). On this project's CPU, `bernoulli_` was 15.6% of a LoRA training
step (SST-2 shapes, torch profiler); a LoRA step ran 1.07x faster with `rand` masks.

T5's attention-probability dropout is a functional call inside its attention function:
`attention_forward` is transformers' eager T5 attention with this dropout, the attention
implementation while training (prefix tuning's attention calls it too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

ATTENTION = "peftlab_eager"
SIDES = ("encoder", "decoder")
CROSS_ATTENTION = ("EncDecAttention", "encoder_attn")  # T5's, BART's


def dropout_seed(seed: int) -> int:
    """A member's dropout stream: derived from its seed, and not torch.manual_seed(seed)'s
    stream (which drew its initialisation)."""
    return int(np.random.SeedSequence([seed, 0x44524F50]).generate_state(1)[0])


class MemberMasks:
    """The members' dropout generators, and the rows of the batch going through the model.

    A micro-batch of each member (`start`) may go through the model in several chunks of
    rows (`chunk`: rows of similar lengths from any members, peftlab.pack). A member draws
    each dropout call's mask once, for its whole micro-batch at its own shape, in the order of
    the calls, as it does alone; a chunk takes its rows' part of it, cut or padded at the end
    of each length to the chunk's (past a row's own length is padding: nothing it computes
    is read). With more than one chunk, the masks drawn are kept until the micro-batch ends.
    """

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(dropout_seed(s))
                           for s in seeds]
        self.members: list[int] = []
        self.own: list[tuple[int, dict[str, int]]] = []  # each part's rows and own lengths
        self.kept: dict[tuple[int, int], torch.Tensor] | None = None
        self.rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # part, its rows, where
        self.whole = True  # the chunk is every row of every part, in order
        self.widths: dict[str, int] = {}
        self.total = 0  # rows in the chunk
        self.call = 0

    def set_batch(self, batches: list[dict[str, torch.Tensor]], members: list[int]) -> None:
        """One chunk of every row of these members' micro-batches, in order."""
        self.start(batches, members, chunks=1)
        self.chunk([(k, r) for k, b in enumerate(batches) for r in range(len(b["input_ids"]))],
                   {side: max(o[side] for _, o in self.own) for side in SIDES})

    def start(self, batches: list[dict[str, torch.Tensor]], members: list[int],
              chunks: int) -> None:
        """A micro-batch of each of these members, going through the model in `chunks`."""
        self.members = list(members)
        self.own = [(len(b["input_ids"]), {"encoder": b["input_ids"].shape[1],
                                           "decoder": b["labels"].shape[1]}) for b in batches]
        self.kept = {} if chunks > 1 else None

    def chunk(self, rows: list[tuple[int, int]], widths: dict[str, int]) -> None:
        """The chunk about to go through the model: its rows as (part, row of the part), in
        order, and its lengths of each side."""
        device = self.generators[0].device
        parts: dict[int, list[tuple[int, int]]] = {}
        for position, (k, r) in enumerate(rows):
            parts.setdefault(k, []).append((r, position))
        self.rows = [(k, torch.tensor([r for r, _ in v], device=device),
                      torch.tensor([pos for _, pos in v], device=device))
                     for k, v in sorted(parts.items())]
        self.whole = rows == [(k, r) for k, (n, _) in enumerate(self.own) for r in range(n)]
        self.widths, self.call, self.total = dict(widths), 0, len(rows)

    def _keep(self, k: int, shape: list[int], p: float) -> torch.Tensor:
        """Part k's member's mask of this call, for its whole micro-batch (drawn once)."""
        key = (k, self.call)
        if self.kept is not None and key in self.kept:
            return self.kept[key]
        device = self.generators[0].device
        # float32 draws whatever x's dtype: bf16 would round the uniform draw to 2^-8 steps
        keep = torch.rand(shape, generator=self.generators[self.members[k]], device=device)
        keep = keep >= p  # a bool: 4x less kept memory than the float draw
        if self.kept is not None:
            self.kept[key] = keep
        return keep

    def apply(self, x: torch.Tensor, p: float, sides: tuple[str | None, ...]) -> torch.Tensor:
        """Dropout of `x`, whose dimension i + 1 is a length of side `sides[i]` (None: not a
        length: features, heads). A prefix or prompt in front of a length changes nothing:
        the padding is at the end."""
        if p == 0:
            return x
        if p >= 1:
            return x * 0
        if not self.rows or self.total != len(x):
            raise RuntimeError(f"dropout of {len(x)} rows, but the batch has "
                               f"{self.total if self.rows else 0}")
        sides = sides + (None,) * (x.dim() - 1 - len(sides))
        pieces = []
        for k, rows, _ in self.rows:
            n, own = self.own[k]
            shape = [n] + [size - (self.widths[side] - own[side]) if side else size
                           for size, side in zip(x.shape[1:], sides)]
            if min(shape) <= 0:
                raise RuntimeError(f"dropout of shape {tuple(x.shape)}: lengths {sides} do "
                                   "not match the batch")
            keep = self._keep(k, shape, p)
            if len(rows) != n:
                keep = keep[rows]
            pad = [a for full, part in zip(reversed(x.shape[1:]), reversed(shape[1:]))
                   for a in (0, full - part)]  # negative: cut at the end
            pieces.append(F.pad(keep, pad) if any(pad) else keep)
        self.call += 1
        if self.whole:
            mask = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        else:
            mask = x.new_zeros(x.shape, dtype=torch.bool)
            for (_, _, positions), piece in zip(self.rows, pieces):
                mask[positions] = piece
        return x * mask.to(torch.float32).mul_(1 / (1 - p)).to(x.dtype)


class MemberDropout(nn.Module):
    """`nn.Dropout` (same p, same scaling by 1 / (1 - p)) with each member's own masks."""

    def __init__(self, p: float, side: str | None, masks: MemberMasks):
        super().__init__()
        self.p, self.side, self.masks = p, side, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return self.masks.apply(x, self.p, (self.side,))


CROSS_KEY_VALUE = ("k", "v", "k_proj", "v_proj")  # projections reading the encoder's states


def side_of(module_name: str) -> str | None:
    """Whose length a module's inputs have: the encoder's, or the decoder's. A cross-
    attention's key and value projections (and an adapter's dropout on them) read the
    encoder's output."""
    parts = module_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in CROSS_ATTENTION and parts[i + 1] in CROSS_KEY_VALUE:
            return "encoder"
    return "decoder" if "decoder" in parts else "encoder" if "encoder" in parts else None


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0,
                      position_bias: torch.Tensor | None = None, **kwargs: object
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager T5 attention (`modeling_t5.eager_attention_forward`), its
    probability dropout drawn per member while a pack trains."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        weights = weights + position_bias
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1)
    members = getattr(module, "peftlab_dropout", None)
    if module.training and dropout > 0 and members is not None:
        masks, q_side, k_side = members
        weights = masks.apply(weights, dropout, (None, q_side, k_side))
    else:
        weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


AttentionInterface.register(ATTENTION, attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def use_member_attention(model: nn.Module) -> None:
    """`attention_forward` as the model's attention, for training and evaluation alike (one
    implementation: what validation selects is computed as the test split is). An attention
    of peftlab's own (prefix tuning's) stays: it calls `attention_forward` itself."""
    transformer = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(transformer.config, "_attn_implementation", None)
    if current is not None and not current.startswith("peftlab_") \
            and hasattr(transformer, "set_attn_implementation"):
        transformer.set_attn_implementation(ATTENTION)


@contextlib.contextmanager
def member_dropout(model: nn.Module, masks: MemberMasks) -> Iterator[None]:
    """Inside the block, every dropout of `model` draws each member's masks: its `nn.Dropout`
    modules (its own and an adapter's) are swapped for `MemberDropout`, and its attention
    modules tell `attention_forward` the members' masks. Everything is put back after the
    block."""
    swapped, tagged = [], []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:  # subclasses may do more than drop
                full_name = f"{parent_name}.{name}" if parent_name else name
                member = MemberDropout(child.p, side_of(full_name), masks)
                member.train(child.training)
                setattr(parent, name, member)
                swapped.append((parent, name, child, member))
        if isinstance(getattr(parent, "dropout", None), float):  # an attention's probability
            q_side = side_of(parent_name)
            k_side = "encoder" if parent_name.endswith(CROSS_ATTENTION) else q_side
            parent.peftlab_dropout = (masks, q_side, k_side)
            tagged.append(parent)
    try:
        yield
    finally:
        for module in tagged:
            del module.peftlab_dropout
        for parent, name, child, member in swapped:
            child.train(member.training)
            setattr(parent, name, child)
