"""Training steps of P members packed on one base model against the same P members' steps
one after another (what P unpacked runs do), on the Flan-T5-small geometry with real SST-2
batches (8 examples per member; `--task samsum`: SAMSum's), fp32, dropout as in training.

    PEFTLAB_DATA_DIR=../shared/data .venv/bin/python benchmarks/pack_step.py \\
        --methods lora,prompt,prefix,ia3,ln --members 1,4,8 --steps 6

Every side runs what training runs (`step_gradients` with each member's dropout masks), each
member's gradient clipping and AdamW step; the figure is the median step time of each (first
step untimed), in one process, sides alternating. The packed step runs twice: in length chunks
(training's way: `peftlab.pack.length_chunks` at the device's `CHUNK_COST`) and as one batch
of every member's rows (`chunk_cost` infinite: every row padded to the longest).

`--count-ops` counts instead the operators one packed step dispatches (forward and backward,
training's chunks; on a GPU each is about one kernel launch), and how many of them compute
the dropout masks: what a launch-bound GPU pays per member.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peftlab.data import tokenize, training_batches
from peftlab.denormals import flushed_denormals
from peftlab.dropout import MemberMasks, member_dropout
from peftlab.methods import METHODS, MethodContext
from peftlab.models import default_tokenizer_for, load_model, load_tokenizer
from peftlab.pack import CHUNK_COST, Pack, initial_state, step_gradients
from peftlab.tasks import build_task, prepare_splits

MODEL = "flan-t5-small-random"


# each task's batches as the seed-study preset trains them (batch size, source and target
# lengths); --batch-size and --lengths change them (the smoke preset's SAMSum: 4 and 96,24)
SHAPES = {"sst2": (8, 128, 4), "samsum": (8, 512, 128)}


def batches(members: int, steps: int, train_size: int = 256, task: str = "sst2",
            batch_size: int | None = None, lengths: tuple[int, int] | None = None
            ) -> list[list[dict]]:
    """Each member's first `steps` training batches as its run draws them (its seed's sample
    of `train_size`, length-grouped batches: `peftlab.data.training_batches`). Consecutive
    examples would be padded more, which the packed side's length chunks remove and the
    one-by-one side pays: that overstates the gain."""
    tokenizer = load_tokenizer(default_tokenizer_for(MODEL))  # the same for every preset
    default_batch, source, target = SHAPES[task]
    source, target = lengths or (source, target)
    spec = build_task(task, {})
    out = []
    for seed in range(members):
        feats = tokenize(tokenizer, prepare_splits(spec, train_size, 8, 8, seed=seed).train,
                         source, target)
        drawn = training_batches(feats, batch_size or default_batch, seed, 0)
        out.append([next(drawn) for _ in range(steps)])
    return out


def _clock(device: torch.device) -> float:
    """The time, after the device's queued work is done (a GPU runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@flushed_denormals()
def measure(name: str, members: int, steps: int, model: str = MODEL,
            device: torch.device = torch.device("cpu"), bf16: bool = False, **shape
            ) -> tuple[float, float, float]:
    method = METHODS[name]
    args, ctx = method.Args(), MethodContext(default_tokenizer_for(model), steps)
    data = batches(members, steps, **shape)
    base = load_model(model).to(device)
    states = [initial_state(method, args, ctx, base, seed) for seed in range(members)]
    pack = Pack(method.apply(copy.deepcopy(base), args, ctx, False).to(device).train(),
                [{n: t.to(device) for n, t in st.items()} for st in states], method.route)
    pack_opts = [torch.optim.AdamW([p for _, p in pack.parameters(m)], lr=1e-3, fused=True)
                 for m in range(members)]
    torch.manual_seed(0)
    alone = method.apply(copy.deepcopy(base), args, ctx, False).to(device).train()
    # each side draws its dropout masks as training does: per member (peftlab.dropout)
    pack_masks = MemberMasks(list(range(members)), device)
    alone_masks = [MemberMasks([m], device) for m in range(members)]
    Pack(alone, [{n: p.detach() for n, p in alone.named_parameters() if p.requires_grad}],
         method.route)  # a run alone: a pack of one
    alone_params = [p for _, p in alone.peftlab_pack.parameters(0)]
    alone_opt = torch.optim.AdamW(alone_params, lr=1e-3, fused=True)
    packed, one_batch, sequential = [], [], []
    for step in range(steps):
        for chunk_cost, times in ((None, packed), (float("inf"), one_batch)):
            began = _clock(device)
            with member_dropout(pack.model, pack_masks):
                step_gradients(pack, [[b[step]] for b in data], device, bf16, 0,
                               pack_masks, chunk_cost=chunk_cost)
            for m, opt in enumerate(pack_opts):
                torch.nn.utils.clip_grad_norm_([p for _, p in pack.parameters(m)], 1.0,
                                               foreach=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
            times.append(_clock(device) - began)
        began = _clock(device)
        for m in range(members):  # the same work as P unpacked runs' steps
            with member_dropout(alone, alone_masks[m]):
                step_gradients(alone.peftlab_pack, [[data[m][step]]], device, bf16, 0,
                               alone_masks[m])
            torch.nn.utils.clip_grad_norm_(alone_params, 1.0, foreach=True)
            alone_opt.step()
            alone_opt.zero_grad(set_to_none=True)
        sequential.append(_clock(device) - began)
    return (statistics.median(packed[1:]), statistics.median(one_batch[1:]),
            statistics.median(sequential[1:]))


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it, and those inside `MemberMasks`."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.dropout = 0
        self.in_masks = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.total += 1
        self.dropout += self.in_masks > 0
        return func(*args, **(kwargs or {}))


def count_ops(name: str, members: int, model: str = MODEL, **shape) -> tuple[int, int]:
    """Operators of one packed training step of `members` members (the second step: the
    first builds what is cached), in length chunks as on a GPU (`CHUNK_COST["cuda"]`), and
    how many computed dropout masks."""
    method = METHODS[name]
    args, ctx = method.Args(), MethodContext(default_tokenizer_for(model), 2)
    data = batches(members, 2, **shape)
    base = load_model(model)
    states = [initial_state(method, args, ctx, base, seed) for seed in range(members)]
    pack = Pack(method.apply(copy.deepcopy(base), args, ctx, False).train(), states,
                method.route)
    masks = MemberMasks(list(range(members)), torch.device("cpu"))
    counter = _OpCounter()
    for attribute in ("start", "chunk", "apply"):  # count what the masks' methods dispatch
        original = getattr(masks, attribute)

        def counted(*a, _original=original, **k):  # noqa: ANN002, ANN003, ANN202
            counter.in_masks += 1
            try:
                return _original(*a, **k)
            finally:
                counter.in_masks -= 1
        setattr(masks, attribute, counted)
    for step in range(2):
        with member_dropout(pack.model, masks):
            if step == 1:
                with counter:
                    step_gradients(pack, [[b[step]] for b in data], torch.device("cpu"),
                                   False, 0, masks, chunk_cost=CHUNK_COST["cuda"])
            else:
                step_gradients(pack, [[b[step]] for b in data], torch.device("cpu"), False,
                               0, masks, chunk_cost=CHUNK_COST["cuda"])
    return counter.total, counter.dropout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,prompt,prefix,ia3,ln")
    parser.add_argument("--members", default="1,4,8")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", default=MODEL, help="a preset: flan-t5-small-random, t5-tiny")
    parser.add_argument("--task", default="sst2", choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, help="default: the task's in SHAPES")
    parser.add_argument("--lengths", help="SOURCE,TARGET token limits; default: SHAPES")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as training on a GPU")
    parser.add_argument("--count-ops", action="store_true",
                        help="count one packed step's operators instead of timing it")
    args = parser.parse_args()
    shape = dict(task=args.task, batch_size=args.batch_size,
                 lengths=tuple(int(n) for n in args.lengths.split(",")) if args.lengths else None)
    if args.count_ops:
        print(f"model {args.model}, {shape}: operators of one packed step (forward, backward; "
              "chunks as on a GPU)")
        print(f"{'method':8s} {'P':>3s} {'operators':>10s} {'of which dropout':>17s} "
              f"{'per member':>11s}")
        for name in args.methods.split(","):
            for members in (int(p) for p in args.members.split(",")):
                total, dropout = count_ops(name, members, args.model, **shape)
                print(f"{name:8s} {members:3d} {total:10,d} {dropout:17,d} "
                      f"{total / members:11,.0f}", flush=True)
        return
    device = torch.device(args.device)
    print(f"model {args.model}, {shape}, {device}, bf16 {args.bf16}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'method':8s} {'P':>3s} {'packed s/step':>14s} {'one batch s':>12s} "
          f"{'one by one s':>13s} {'speedup':>8s} {'(one batch)':>12s} {'packed ex/s':>12s}")
    rows = args.batch_size or SHAPES[args.task][0]
    for name in args.methods.split(","):
        for members in (int(p) for p in args.members.split(",")):
            packed, one_batch, sequential = measure(name, members, args.steps, args.model,
                                                   device, args.bf16, **shape)
            print(f"{name:8s} {members:3d} {packed:14.3f} {one_batch:12.3f} {sequential:13.3f} "
                  f"{sequential / packed:7.2f}x {sequential / one_batch:11.2f}x "
                  f"{rows * members / packed:12.1f}", flush=True)


if __name__ == "__main__":
    main()
