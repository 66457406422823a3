"""Packs: several runs of one method trained on ONE copy of the frozen base model.

The members of a pack differ only in seed (initialisation, training sample, batch order),
learning rate and training size. Their micro-batches go through the model together (their
rows sorted by length into chunks: `length_chunks`); each row is routed to its member's
trainable tensors, so the base model's matrix products run once over the rows of every
member. peft trains one adapter per batch (its mixed-adapter batches are for inference),
hence this module.

How a member's tensors live here: every trainable tensor of the method becomes a `Stack`, one
`[members, *shape]` storage whose row m is member m's tensor, aliased by a plain
`nn.Parameter` of the original shape and name. Optimizers, gradient clipping, checkpoints and
exports see those member parameters, exactly as an unpacked run sees its own: an unpacked run
is a pack of one, and nothing else changes for it. The method's modules read the stacked
storage through a `Router`, which knows the member of each row of the current batch.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data import IGNORE_INDEX
from peftlab.device import CHUNK_COST, autocast
from peftlab.dropout import MemberMasks, use_member_attention


class Router:
    """The member of each row of the batch going through the model."""

    def __init__(self, members: int):
        self.members = members
        self.route: torch.Tensor | None = None
        self.by_member = False  # rows are the members themselves, in order (prefix MLPs)
        self.only: int | None = None  # every row is this member's (its evaluation)
        self.host_route: torch.Tensor | None = None  # `route` on the host, if given
        self._segments: tuple[torch.Tensor, list[tuple[int, int]]] | None = None

    @property
    def member(self) -> int | None:
        """The one member every row belongs to, if there is one: the module then computes as
        the unpacked method does, on that member's tensors (bit for bit an unpacked run's
        computation: a member's evaluation and a pack of one)."""
        return 0 if self.members == 1 else self.only

    @contextlib.contextmanager
    def _set(self, name: str, value: Any) -> Iterator[None]:
        """`self.<name>` is `value` inside the block, what it was after."""
        previous = getattr(self, name)
        setattr(self, name, value)
        try:
            yield
        finally:
            setattr(self, name, previous)

    def evaluating(self, member: int) -> contextlib.AbstractContextManager:
        """Every row that goes through the model inside the block is member `member`'s."""
        return self._set("only", member)

    @contextlib.contextmanager
    def routing(self, route: torch.Tensor, host: torch.Tensor | None = None) -> Iterator[None]:
        """Rows go to `route`'s members inside the block; `host`: the same route on the host,
        from which its runs of members are read without waiting for a GPU."""
        with self._set("route", route), self._set("host_route", host):
            yield

    def each_member(self) -> contextlib.AbstractContextManager:
        """Row m is member m's: a computation per member (the prefix MLP on its embedding),
        with no per-row copy of the weights."""
        return self._set("by_member", True)

    def take(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """`values[member of row]` for each of `n` rows (`values`: a leading member dimension).

        The rows of a batch come in runs of one member's (a member's micro-batch, its chunk
        rows, its tiled evaluation copy): each run is its member's values expanded, so the
        backward sums over the run, where a gather's backward (a scatter-add) made packed
        prefix tuning on the Flan-T5-small geometry no faster than its members one by one."""
        segments = self.segments(n)
        if len(segments) > 2 * len(values):  # rows interleaved: a gather is cheaper
            return values[self.rows(n)]
        return torch.cat([values[m].expand(count, *values.shape[1:]) for m, count in segments])

    def segments(self, n: int) -> list[tuple[int, int]]:
        """The runs of rows of one member among `n` rows: (member, rows), in order."""
        if self.route is None or n % len(self.route):
            self.rows(n)  # raises: no route, or rows that cannot be routed
        if self._segments is None or self._segments[0] is not self.route:
            # once per route (every routed module asks), from the host copy where there is one:
            # `tolist` of a GPU tensor waits for the GPU
            source = self.host_route if self.host_route is not None else self.route
            members, counts = torch.unique_consecutive(source, return_counts=True)
            self._segments = (self.route, list(zip(members.tolist(), counts.tolist())))
        factor = n // len(self.route)  # each row repeated `factor` times, in place
        return [(m, count * factor) for m, count in self._segments[1]]

    def rows(self, n: int) -> torch.Tensor:
        """The member of each of `n` rows. A batch expanded row by row (`repeat_interleave`:
        rank classification's candidates, beam search) keeps each row's member."""
        if self.route is None:
            raise RuntimeError("a packed model was called without a route")
        if n == len(self.route):
            return self.route
        if n % len(self.route):
            raise RuntimeError(f"{n} rows cannot be routed from {len(self.route)}")
        return self.route.repeat_interleave(n // len(self.route))


class Stack:
    """One trainable tensor of every member: `storage[m]` is member m's, aliased by
    `members[m]` (an `nn.Parameter` sharing its memory: the optimizer's step on it is a step
    on the storage). `live` is what a forward reads: the storage, or during a training step a
    leaf that collects every member's gradient at once (handed out by `end_step`)."""

    def __init__(self, values: list[torch.Tensor]):
        self.storage = torch.stack([v.detach() for v in values])
        self.members = [nn.Parameter(self.storage[m]) for m in range(len(values))]
        self.live = self.storage

    def begin_step(self) -> None:
        self.live = self.storage.detach().requires_grad_(True)

    def end_step(self) -> None:
        grad = self.live.grad
        for m, p in enumerate(self.members):
            p.grad = None if grad is None else grad[m]
        self.live = self.storage


def per_row(stack: Stack, router: Router, n: int) -> torch.Tensor:
    """Each of `n` rows' tensor: `[n, *shape]` (a view for a pack of one)."""
    if router.member is not None:
        return stack.live[router.member].expand(n, *stack.live.shape[1:])
    return router.take(stack.live, n)


class RoutedLinear(nn.Module):
    """`nn.Linear` whose weight (and bias) is each row's member's: LoRA's A and B."""

    def __init__(self, weight: Stack, bias: Stack | None, router: Router):
        super().__init__()
        self.weight_stack, self.bias_stack, self.router = weight, bias, router

    @property
    def weight(self) -> torch.Tensor:
        """Every member's weight, (members, out, in): callers read its dtype and device."""
        return self.weight_stack.live

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_stack.live
        b = None if self.bias_stack is None else self.bias_stack.live
        m = self.router.member
        if m is not None:  # exactly nn.Linear's computation
            return F.linear(x, w[m], None if b is None else b[m])
        n = x.shape[0]
        if self.router.by_member:
            if n != len(w):
                raise RuntimeError(f"{n} rows for {len(w)} members")
        else:
            route = self.router.rows(n)
            w, b = w[route], None if b is None else b[route]
        out = torch.bmm(x.reshape(n, -1, x.shape[-1]), w.transpose(1, 2))
        if b is not None:
            out = out + b[:, None, :]
        return out.reshape(*x.shape[:-1], w.shape[1])


def routed_model(model: nn.Module, stacks: dict[str, Stack], router: Router) -> None:
    """Replace the `nn.Linear` modules that own trainable tensors by their routed form (LoRA's A
    and B, the prefix MLP); methods with other trainable modules route those themselves."""
    for module_name in dict.fromkeys(name.rpartition(".")[0] for name in stacks):
        module = model.get_submodule(module_name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"no routed form for {type(module).__name__} `{module_name}`")
        routed = RoutedLinear(stacks[f"{module_name}.weight"], stacks.get(f"{module_name}.bias"),
                              router)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, routed)


def concat_batches(batches: list[dict[str, torch.Tensor]], pad_id: int
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One batch of every member's micro-batch (padded to the longest), and each row's
    member. Extra padding changes nothing a row computes: padded keys are masked, padded
    labels ignored."""
    def padded(key: str, value: int) -> torch.Tensor:
        width = max(b[key].shape[1] for b in batches)
        return torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches])

    batch = {"input_ids": padded("input_ids", pad_id), "attention_mask": padded("attention_mask", 0),
             "labels": padded("labels", IGNORE_INDEX)}
    route = torch.cat([torch.full((len(b["input_ids"]),), m) for m, b in enumerate(batches)])
    return batch, route


def member_token_losses(logits: torch.Tensor, labels: torch.Tensor, member: torch.Tensor,
                        members: int) -> torch.Tensor:
    """Each member's summed token cross-entropy, `[members]`: `logits` [*tokens, vocab],
    `labels` and each token's `member` [*tokens]."""
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    return torch.zeros(members, device=logits.device).index_add(0, member.reshape(-1), per_token)


@contextlib.contextmanager
def head_at(model: nn.Module, positions: torch.Tensor) -> Iterator[bool]:
    """The LM head computes logits only at `positions` (indices into the flattened [rows x
    length] decoder positions; an index, not a boolean mask, which a GPU must synchronise to
    size): [n, vocab].
    The loss needs no other, and a batch's padded target positions (its rows' lengths differ)
    cost the head's product with the whole vocabulary and a log-softmax over it, forward and
    backward: a packed SAMSum step of 4 members on the Flan-T5-small geometry took 5.13 s
    instead of 5.54 (12.1 s instead of 18.1 as one batch; docs/speed.md, "Packs").
    Yields False (logits at every position) where the head is not a plain `nn.Linear` (a
    method adapting it routes its rows)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        yield False
        return
    hook = head.register_forward_pre_hook(
        lambda module, args: (args[0].flatten(0, 1).index_select(0, positions),))
    try:
        yield True
    finally:
        hook.remove()


class Pack:
    """A model whose method's trainable tensors are every member's (`stacks`), and the
    router that tells its modules each row's member.

    A method without a routed form (`route` None: full fine-tuning, other peft adapters)
    makes a pack of one whose trainable tensors stay the model's own parameters.
    """

    def __init__(self, model: nn.Module, states: list[dict[str, torch.Tensor]], route: Any):
        names = list(states[0])
        if any(list(s) != names for s in states):
            raise ValueError("the members of a pack must have the same trainable tensors")
        if route is None and len(states) > 1:
            raise ValueError("this method cannot be packed: it has no routed form")
        self.model, self.router = model, Router(len(states))
        self.stacks: dict[str, Stack] = {}
        self.own = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if route is not None:
            self.stacks = {name: Stack([s[name] for s in states]) for name in names}
            for p in model.parameters():
                p.requires_grad_(False)  # the stacks train; the base model never does
            route(model, self.stacks, self.router)
            self.own = []
        # a method's modules that compute once per training step (`training_step`)
        self.step_modules = [m for m in model.modules() if hasattr(m, "begin_training_step")]
        model.peftlab_pack = self  # what a method's export and load find the members by
        use_member_attention(model)  # attention dropout drawn per member (peftlab.dropout)

    @property
    def members(self) -> int:
        return self.router.members

    def parameters(self, member: int) -> list[tuple[str, nn.Parameter]]:
        """Member `member`'s trainable tensors by their unpacked names (views of the stacks)."""
        if not self.stacks:
            return list(self.own)
        return [(name, stack.members[member]) for name, stack in self.stacks.items()]

    def state(self, member: int) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.parameters(member)}

    @contextlib.contextmanager
    def training_step(self) -> Iterator[None]:
        """Gradients collected for every member at once, handed to each member's parameters.
        A method's module that computes once per step what every forward of the step reads
        (prefix tuning's MLP) is told where the step begins and ends."""
        modules = self.step_modules
        for stack in self.stacks.values():
            stack.begin_step()
        for module in modules:
            module.begin_training_step()
        try:
            yield
        except BaseException:
            for module in modules:
                module.end_training_step(backward=False)
            raise
        else:
            for module in modules:  # the rest of the backward, into the stacks
                module.end_training_step()
        finally:
            for stack in self.stacks.values():
                stack.end_step()


def cast_stacks(model: nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)` for a packed model's stacks too (they are not registered tensors):
    the bf16 copy evaluation makes of a packed model. A deep copy copies the pack with the
    modules, so its stacks are the ones the copy's modules read."""
    pack = getattr(model, "peftlab_pack", None)
    for stack in pack.stacks.values() if pack is not None else ():
        stack.storage = stack.storage.to(dtype)
        stack.live = stack.storage


def initial_state(method: Any, args: Any, ctx: Any, base: nn.Module, seed: int
                  ) -> dict[str, torch.Tensor]:
    """A member's trainable tensors as its unpacked run starts them: the method applied to a
    copy of the base model right after seeding with the member's seed."""
    # A method that adds its own tensors never changes the base weights: the copy shares them
    # (the deepcopy memo), and only its modules are new; a 77M-parameter copy per member took
    # 3.2 s on a CPU. A method that trains base weights (layer norms) gets its own copy.
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())} \
        if method.adds_parameters else {}
    requires = {id(p): p.requires_grad for p in base.parameters()}
    torch.manual_seed(seed)
    adapted = method.apply(copy.deepcopy(base, memo), args, ctx, False)
    state = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
    for p in base.parameters():  # the copy's freezing reached the shared weights: undone
        p.requires_grad_(requires[id(p)])
    return state


def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: the labels shifted right, as the model does when given labels."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.prepare_decoder_input_ids_from_labels(labels=labels)


def _lengths(batch: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """Each row's own encoder and decoder length (its last real position + 1)."""
    def last(real: torch.Tensor) -> list[int]:
        positions = torch.arange(1, real.shape[1] + 1)
        return (real.cpu() * positions).amax(1).tolist()

    return last(batch["attention_mask"] > 0), last(batch["labels"] != IGNORE_INDEX)


Lengths = list[tuple[list[int], list[int]]]  # each batch's `_lengths`


def length_chunks(batches: list[dict[str, torch.Tensor]], chunk_cost: float,
                  lengths: Lengths | None = None) -> list[list[tuple[int, int]]]:
    """The rows of several members' micro-batches, (batch, row), in chunks of similar
    lengths.

    Concatenated as they are, every row is padded to the longest of all members' rows: a pack
    of 4 SST-2 members computed 1.36x the positions its members compute alone (1.54x for 8),
    and a CPU pays for every one. Rows sorted by length are cut into chunks (at multiples of
    a micro-batch's size, so that no chunk is smaller than a run alone uses) where the
    positions saved pay for the chunk's fixed cost; within a chunk, rows keep their order.
    """
    size = max(len(b["input_ids"]) for b in batches)
    rows = []
    for k, (encoder, decoder) in enumerate(lengths or [_lengths(b) for b in batches]):
        rows += [(e, d, k, r) for r, (e, d) in enumerate(zip(encoder, decoder))]
    rows.sort()
    cuts = list(range(0, len(rows), size))[1:]
    points = [0, *cuts, len(rows)]
    best: list[tuple[float, int]] = [(0.0, 0)]  # cost of rows[:points[j]], previous point
    for j in range(1, len(points)):
        options = []
        for i in range(j):
            span = rows[points[i]:points[j]]
            width = span[-1][0] + max(d for _, d, _, _ in span)
            options.append((best[i][0] + len(span) * width + chunk_cost, i))
        best.append(min(options))
    chunks, j = [], len(points) - 1
    while j > 0:
        i = best[j][1]
        chunks.append(sorted((k, r) for _, _, k, r in rows[points[i]:points[j]]))
        j = i
    return chunks[::-1]


def gather_rows(batches: list[dict[str, torch.Tensor]], rows: list[tuple[int, int]],
                pad_id: int, lengths: Lengths | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, int]]:
    """One batch of the given rows (in order), padded to their longest own lengths; each
    row's batch; the batch's length of each side."""
    lengths = lengths or [_lengths(b) for b in batches]
    widths = {"encoder": max(lengths[k][0][r] for k, r in rows),
              "decoder": max(lengths[k][1][r] for k, r in rows)}
    picked: dict[int, list[int]] = {}
    for k, r in rows:
        picked.setdefault(k, []).append(r)

    def take(key: str, width: int, value: int) -> torch.Tensor:
        out = []
        for k, rs in picked.items():
            part = batches[k][key][rs][:, :width]
            out.append(F.pad(part, (0, width - part.shape[1]), value=value))
        return torch.cat(out)

    batch = {"input_ids": take("input_ids", widths["encoder"], pad_id),
             "attention_mask": take("attention_mask", widths["encoder"], 0),
             "labels": take("labels", widths["decoder"], IGNORE_INDEX)}
    member_of_row = torch.tensor([k for k, rs in picked.items() for _ in rs])
    return batch, member_of_row, widths


def step_gradients(pack: Pack, micro_batches: list[list[dict[str, torch.Tensor]]],
                   device: torch.device, bf16: bool, pad_id: int,
                   masks: MemberMasks | None = None, chunk_cost: float | None = None
                   ) -> list[float | None]:
    """Backward over one optimizer step of every member at once; each member's step loss.

    `micro_batches[m]` is member m's micro-batches for the step (empty: the member does not
    train any more, e.g. it diverged). Micro-batch i of every member goes through the model
    at once. A member's loss is the mean over its step's target tokens, each micro-batch
    weighted by its share of them, so that gradient accumulation gives the gradient of one
    batch holding them all (dividing each micro-batch's mean by their number instead weighted
    a token of a short micro-batch more: 18.8% off on two SAMSum micro-batches of 62 and 40
    tokens). The members' losses are summed for the backward: their tensors are disjoint, so
    each gets its own gradient. `masks`: the members' dropout (peftlab.dropout), told the
    rows of each batch. In a pack, the rows of micro-batch i go through in chunks of
    similar lengths (`length_chunks`; `chunk_cost` None: the device's `CHUNK_COST`).
    """
    active = [m for m, batches in enumerate(micro_batches) if batches]
    # counted on the host where the batches are, sent once (no copy or wait per member)
    totals = _to_device(torch.tensor([
        max(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches[m]), 1)
        if m in active else 1 for m in range(pack.members)], dtype=torch.float32), device)
    losses = torch.zeros(pack.members, device=device)
    with pack.training_step():
        for i in range(max(len(micro_batches[m]) for m in active)):
            parts = [(m, micro_batches[m][i]) for m in active if i < len(micro_batches[m])]
            members, batches = [m for m, _ in parts], [b for _, b in parts]
            lengths = [_lengths(b) for b in batches] if len(batches) > 1 else None
            chunks = length_chunks(batches, chunk_cost if chunk_cost is not None
                                   else CHUNK_COST.get(device.type, CHUNK_COST["cuda"]),
                                   lengths) if lengths else None
            if chunks is None or len(chunks) == 1:  # every row, in order (a run alone)
                if masks is not None:  # each member's own dropout masks
                    masks.set_batch(batches, members)
                batch, member_of_row = concat_batches(batches, pad_id)
                losses += _chunk_backward(pack, batch, member_of_row, members, totals,
                                          device, bf16)
                continue
            if masks is not None:
                masks.start(members)
            for rows in chunks:
                batch, member_of_row, _ = gather_rows(batches, rows, pad_id, lengths)
                if masks is not None:
                    masks.chunk(rows)
                losses += _chunk_backward(pack, batch, member_of_row, members, totals,
                                          device, bf16)
    values = losses.tolist()  # one transfer for every member's loss
    return [values[m] if m in active else None for m in range(pack.members)]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device; to a GPU from pinned memory without waiting for it."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _chunk_backward(pack: Pack, batch: dict[str, torch.Tensor], member_of_row: torch.Tensor,
                    members: list[int], totals: torch.Tensor, device: torch.device,
                    bf16: bool) -> torch.Tensor:
    """Forward and backward of one batch of rows; each member's share of its step loss."""
    # Every index built on the host, where the batch is, and sent once: a route gathered on
    # the device, or a boolean mask indexed there, made a GPU wait for each chunk.
    labelled = (batch["labels"] != IGNORE_INDEX).flatten().nonzero().squeeze(1)
    host_route = torch.tensor(members)[member_of_row]
    route = _to_device(host_route, device)
    positions = _to_device(labelled, device)
    batch = {k: _to_device(v, device) for k, v in batch.items()}
    labels = batch["labels"]
    token_member = route[:, None].expand(labels.shape)
    with pack.router.routing(route, host_route), autocast(device, bf16), \
            head_at(pack.model, positions) as selected:
        logits = pack.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            decoder_input_ids=decoder_inputs(pack.model, labels)).logits
    if selected:
        labels = labels.flatten().index_select(0, positions)
        token_member = token_member.flatten().index_select(0, positions)
    step = member_token_losses(logits, labels, token_member, pack.members) / totals
    step.sum().backward()
    return step.detach()
