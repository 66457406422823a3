"""Full fine-tuning steps of P members packed with torch.func (one model's code over stacked
parameters: `stack_module_state` + `functional_call` + `vmap`) against the same P members'
steps one after another: does a measured gain justify packing full fine-tuning?

    PEFTLAB_DATA_DIR=../shared/data .venv/bin/python benchmarks/full_pack_step.py \\
        --members 1,4 --steps 5 --model flan-t5-small-random

Both sides train with dropout on (fp32, or bf16 autocast with --bf16), clip each member's
gradient norm to 1 and take an AdamW step (fused on the one-by-one side; one optimizer over the
stacked tensors on the packed side). Batches are each member's first SST-2 training batches as
its run draws them (length-grouped batches of 8, `pack_step.batches`). vmap needs one shape
for every member: the packed side pads every member's batch to the longest member's; the
one-by-one side computes each batch at its own length. Neither side passes an attention mask:
transformers builds its mask with a branch on the mask's values (skipped where all ones),
which vmap refuses; without one, every position is attended, the same arithmetic. The figure
is the median step time (first step untimed), sides alternating in one process. A timing
only: the packed side's dropout masks are vmap's, not each member's own generator's, so its
members would not reproduce their runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from pack_step import batches  # benchmarks/ is this script's folder: on sys.path
from torch.func import functional_call, stack_module_state, vmap

from peftlab.denormals import flushed_denormals
from peftlab.models import load_model


def stacked(data: list[list[dict]], step: int, key: str) -> torch.Tensor:
    """Every member's batch of `step` as one [members, batch, length] tensor, padded at the
    end to the longest member's (input ids with 0, the pad id; labels with -100, no loss)."""
    rows = [d[step][key] for d in data]
    longest = max(r.shape[1] for r in rows)
    fill = -100 if key == "labels" else 0
    return torch.stack([torch.nn.functional.pad(r, (0, longest - r.shape[1]), value=fill)
                        for r in rows])


def clip_members(grads: list[torch.Tensor], max_norm: float) -> None:
    """Each member's gradient (row m of every stacked tensor) clipped to its own norm."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))


@flushed_denormals()
def measure(members: int, steps: int, model_name: str, device: torch.device, bf16: bool
            ) -> tuple[float, float]:
    data = [[{k: v.to(device) for k, v in b.items()} for b in d] for d in batches(members, steps)]
    base = load_model(model_name).train().to(device)
    params, buffers = stack_module_state([base] * members)  # copies: [members, *shape] leaves
    skeleton = copy.deepcopy(base)  # its parameters replaced by each member's in every call

    def member_loss(p: dict, b: dict, input_ids: torch.Tensor, labels: torch.Tensor
                    ) -> torch.Tensor:
        """One member's batch loss, through the one model's code with its parameters."""
        return functional_call(skeleton, (p, b), kwargs=dict(input_ids=input_ids,
                                                             labels=labels)).loss

    packed_loss = vmap(member_loss, randomness="different")
    stacked_params = list(params.values())
    packed_opt = torch.optim.AdamW(stacked_params, lr=1e-4)
    alone = copy.deepcopy(base)
    alone_opt = torch.optim.AdamW(alone.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    packed, sequential = [], []
    for step in range(steps):
        began = clock()
        with autocast:
            losses = packed_loss(params, buffers, stacked(data, step, "input_ids"),
                                 stacked(data, step, "labels"))
        losses.sum().backward()
        clip_members([p.grad for p in stacked_params], 1.0)
        packed_opt.step()
        packed_opt.zero_grad(set_to_none=True)
        packed.append(clock() - began)
        began = clock()
        for m in range(members):  # the same work as P unpacked runs' steps
            b = data[m][step]
            with autocast:
                loss = alone(input_ids=b["input_ids"], labels=b["labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(alone.parameters(), 1.0, foreach=True)
            alone_opt.step()
            alone_opt.zero_grad(set_to_none=True)
        sequential.append(clock() - began)
    return statistics.median(packed[1:]), statistics.median(sequential[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="1,4")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--model", default="flan-t5-small-random",
                        help="a preset: flan-t5-small-random, t5-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as on a GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"model {args.model}, full fine-tuning, {device}, {'bf16' if args.bf16 else 'fp32'}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'P':>3s} {'packed s/step':>14s} {'one by one s':>13s} {'speedup':>8s}")
    for members in (int(p) for p in args.members.split(",")):
        packed, sequential = measure(members, args.steps, args.model, device, args.bf16)
        print(f"{members:3d} {packed:14.3f} {sequential:13.3f} {sequential / packed:7.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
