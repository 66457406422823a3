"""Every CPU/GPU policy in one place: which device a run uses, where bf16 pays, how much
memory is free, how a pack's work is cut and evaluated on each kind of device, and how a
study's workers share the CPUs and GPUs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftlab.errors import PeftlabError

if TYPE_CHECKING:
    from peftlab.config import RunConfig


def resolve_device(cfg: RunConfig) -> torch.device:
    """`device: auto` is a GPU when there is one."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PeftlabError("`device: cuda` but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def native_bf16(device: torch.device) -> bool:
    """Does this device multiply bf16 matrices in hardware? A CPU without AVX512-BF16 or AMX
    emulates them, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu  # torch's own CPU capability probes: private, hence the fallback
    return any(getattr(cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    """Training. auto: bf16 autocast on a GPU that supports it; fp32 on CPU, where bf16
    training moved full fine-tuning's loss curve and metric (docs/speed.md)."""
    if cfg.precision == "auto":
        return device.type == "cuda" and native_bf16(device)
    return cfg.precision == "bf16"


def use_bf16_eval(cfg: RunConfig, split: str) -> bool:
    """Evaluation. fp32 (the default) everywhere, so what validation selects (checkpoint,
    learning rate, size) is chosen on the numbers the test split reports: bf16 rounding
    flipped 12% of a near-chance model's predictions (docs/speed.md). `bf16-validation`
    evaluates the repeated validation passes on a bf16 copy (about twice as fast where bf16
    is native) and the test split in fp32; `bf16` evaluates both in bf16."""
    if cfg.eval_precision == "bf16-validation":
        return split != "test"
    return cfg.eval_precision == "bf16"


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `bf16`, else nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate: free GPU memory, or MemAvailable (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# What one more chunk of a micro-batch costs, in row-tokens (a row of the batch times a
# position of its padded length): each forward and backward has a fixed cost, larger on a GPU
# (kernel launches) than on a CPU (where the matrix products dominate and padding is paid in
# full). Chosen by measurement: docs/speed.md, "Packs".
CHUNK_COST = {"cpu": 256, "cuda": 16384}


# Whether a pack evaluates its members together (each batch of inputs tiled once per member,
# rows routed to their members: peftlab.evaluate), by device type; otherwise member after
# member, each at its run's own batches. On this CPU the larger batch costs more than it saves:
# SAMSum cells of the Flan-T5-small geometry in packs of 4 spent 1.27x their unpacked runs'
# time in validation with every member in one batch, 1.21x with two members a batch (whole
# runs 0.88x and 0.89x), and SST-2 cells 1.06x (docs/speed.md). On a GPU one run's batch
# leaves the device idle: members go together there (measured by the GPU check's
# eval-together step).
EVALUATE_TOGETHER = {"cpu": False}  # other devices: True


def threads_per_worker(workers: int) -> int:
    """CPU threads each of `workers` parallel runs gets: the CPUs split between them."""
    return max(1, (os.cpu_count() or 1) // workers)


def worker_gpus(gpus: int) -> list[str]:
    """The GPUs workers are pinned to, as CUDA_VISIBLE_DEVICES names them: the parent's own
    list when it has one (`CUDA_VISIBLE_DEVICES=2,3`: the workers get 2 and 3, not 0 and 1),
    else the indices."""
    inherited = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
                 if d.strip()]
    return inherited[:gpus] if len(inherited) >= gpus else [str(i) for i in range(gpus)]


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
