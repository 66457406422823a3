"""Dropout while training: each run's masks from its own key, whatever it is packed with.

Why not `nn.Dropout`: in a pack (peftlab.pack) the rows of several runs go through one
forward. One mask drawn for the whole batch from torch's global generator would give each run
masks that depend on the runs packed with it (how many, how long their batches are), so a
run's result would depend on how it was scheduled.

Here a mask element is a hash of the member's key and the element's place: the member's
micro-batch (a 63-bit key drawn from the member's own generator, seeded from its seed, when
the micro-batch starts), the row within it, the dropout call, and the element's position in
every other dimension. Padding is at the end of each length (and a prompt's or prefix's
positions in front of every row alike), so a position means the same token packed or alone,
whatever the batch's widths: a member's masks are the ones it has alone, and a run alone is a
pack of one. Every member's mask of a call is computed at once, by about 15 element-wise
integer operations on the device: drawing them member by member (one `torch.rand` each, cut or
padded to the batch's widths, concatenated) cost about 5 kernel launches per member and call,
which a GPU pays one at a time (84 calls a step on Flan-T5-small; `benchmarks/pack_step.py
--count-ops` counts them). On this project's CPU a step costs the same either way.

The hash is SplitMix64's finaliser (a bijection with full avalanche): each call's row keys
are hashed on the host, each position's coordinates once per shape on the device, and the
element is the finaliser of the two XORed. An element is kept when its hash, read as a signed
64-bit integer, is at least p x 2^64 - 2^63: a Bernoulli(1 - p), as `nn.Dropout`, with its
scaling by 1 / (1 - p).

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


def dropout_seed(seed: int) -> int:
    """A member's dropout stream: derived from its seed, and not torch.manual_seed(seed)'s
    stream (which drew its initialisation)."""
    return int(np.random.SeedSequence([seed, 0x44524F50]).generate_state(1)[0])


STRIDE_BITS = 20  # a position's code: each dimension after the rows below 2^20
CALLS_PER_TABLE = 128  # dropout calls whose row keys are computed and sent at once
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's finaliser


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of 64-bit words with full avalanche), on the host."""
    z = z.astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def _signed(c: int) -> int:
    return c - 2**64 if c >= 2**63 else c


def mix64_(z: torch.Tensor) -> torch.Tensor:
    """`mix64` of an int64 tensor (the same bits), in place, on its device. torch's int64 is
    signed: a right shift fills with the sign, so the shifted-in bits are cleared."""
    for shift, multiplier in ((30, _M1), (27, _M2), (31, None)):
        z.bitwise_xor_((z >> shift).bitwise_and_(2**(64 - shift) - 1))
        if multiplier is not None:
            z.mul_(_signed(multiplier))  # wraps: the low 64 bits of the product
    return z


class MemberMasks:
    """The members' dropout keys, and the rows of the batch going through the model.

    A micro-batch of each member (`start`) may go through the model in several chunks of
    rows (`chunk`: rows of similar lengths from any members, peftlab.pack). Each member draws
    one key from its generator when its micro-batch starts, as it does alone; every mask of
    the micro-batch follows from it (module docstring), so a chunk needs nothing kept from
    another.
    """

    def __init__(self, seeds: list[int], device: torch.device):
        # host generators: one draw per member and micro-batch, nothing waits on the device
        self.generators = [torch.Generator().manual_seed(dropout_seed(s)) for s in seeds]
        self.device = device
        self.keys: list[int] = []  # each part's key of this micro-batch
        self.row_keys = np.zeros(0, dtype=np.uint64)  # each row of the chunk's: part, row
        self.table: torch.Tensor | None = None  # (calls, rows): each call's row keys
        self.places: dict[tuple[int, ...], torch.Tensor] = {}
        self.total = 0  # rows in the chunk
        self.call = 0

    def set_batch(self, batches: list[dict[str, torch.Tensor]], members: list[int]) -> None:
        """One chunk of every row of these members' micro-batches, in order."""
        self.start(members)
        self.chunk([(k, r) for k, b in enumerate(batches) for r in range(len(b["input_ids"]))])

    def start(self, members: list[int]) -> None:
        """A micro-batch of each of these members starts (in one chunk of rows or several)."""
        self.keys = [int(torch.randint(0, 2**63 - 1, (), generator=self.generators[m]))
                     for m in members]

    def chunk(self, rows: list[tuple[int, int]]) -> None:
        """The chunk about to go through the model: its rows as (part, row of the part), in
        order (its widths change nothing: a position is its own)."""
        keys = np.array([self.keys[k] for k, _ in rows], dtype=np.uint64)
        self.row_keys = mix64(keys ^ mix64(np.array([r for _, r in rows], dtype=np.uint64)))
        self.table, self.places, self.call, self.total = None, {}, 0, len(rows)

    def _call_keys(self) -> torch.Tensor:
        """This call's key of each row: computed on the host for CALLS_PER_TABLE calls at a
        time and sent in one copy."""
        first = self.call - self.call % CALLS_PER_TABLE
        if self.table is None or self.call % CALLS_PER_TABLE == 0:
            calls = mix64(np.arange(first, first + CALLS_PER_TABLE, dtype=np.uint64)
                          + np.uint64(0x9E3779B97F4A7C15))
            host = torch.from_numpy(mix64(calls[:, None] ^ self.row_keys[None, :])
                                    .view(np.int64))
            self.table = (host.pin_memory().to(self.device, non_blocking=True)
                          if self.device.type == "cuda" else host.to(self.device))
        return self.table[self.call - first]

    def _place(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Each position's hash, from its coordinates (STRIDE_BITS each: distinct positions,
        distinct codes); one per shape and chunk (a shape recurs in every layer)."""
        if shape not in self.places:
            if len(shape) > 3 or max(shape) >= 2**STRIDE_BITS:
                raise RuntimeError(f"dropout of positions {shape}: at most 3 dimensions after "
                                   f"the rows, each below 2^{STRIDE_BITS}")
            code = torch.zeros((), dtype=torch.int64, device=self.device)
            for size in shape:
                code = code[..., None] * 2**STRIDE_BITS + torch.arange(size, device=self.device)
            self.places[shape] = mix64_(code)
        return self.places[shape]

    def apply(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout of `x`, whose first dimension is the chunk's rows."""
        if p == 0:
            return x
        if p >= 1:
            return x * 0
        if not self.total or self.total != len(x):
            raise RuntimeError(f"dropout of {len(x)} rows, but the batch has {self.total}")
        keys = self._call_keys().view(-1, *[1] * (x.dim() - 1))
        uniform = mix64_(keys ^ self._place(tuple(x.shape[1:])))  # uniform over int64
        self.call += 1
        keep = uniform >= min(round(p * 2**64) - 2**63, 2**63 - 1)  # probability 1 - p
        return torch.where(keep, x * (1 / (1 - p)), 0.0)


class MemberDropout(nn.Module):
    """`nn.Dropout` (same p, same scaling by 1 / (1 - p)) with each member's own masks."""

    def __init__(self, p: float, masks: MemberMasks):
        super().__init__()
        self.p, self.masks = p, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return self.masks.apply(x, self.p)


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
    masks = getattr(module, "peftlab_dropout", None)
    if module.training and dropout > 0 and masks is not None:
        weights = masks.apply(weights, dropout)
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
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:  # subclasses may do more than drop
                member = MemberDropout(child.p, masks)
                member.train(child.training)
                setattr(parent, name, member)
                swapped.append((parent, name, child, member))
        if isinstance(getattr(parent, "dropout", None), float):  # an attention's probability
            parent.peftlab_dropout = masks
            tagged.append(parent)
    try:
        yield
    finally:
        for module in tagged:
            del module.peftlab_dropout
        for parent, name, child, member in swapped:
            child.train(member.training)
            setattr(parent, name, child)
