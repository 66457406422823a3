"""Each run's own peak memory, also when one process runs many runs (a study's workers).

`getrusage(RUSAGE_SELF).ru_maxrss` is the process's high-water mark since it started: with
one worker running every cell, each run reported the largest peak of all runs before it
(604 -> 787 -> 884 -> 1397 MB), and PEFT runs after a full fine-tuning run seemed to need more
memory than it. Here the high-water mark is reset when a run starts: on GPU torch's
allocator statistics; on Linux the kernel's resident-set peak (`/proc/self/clear_refs`, 5),
after handing freed heap pages back to the system (glibc's `malloc_trim`), so the peak is the
resident memory of the process while this run ran, as a fresh process running it alone would
see it, give or take what the process still caches (the parsed data set, loaded libraries).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class PeakMemory:
    """Reset at `start()`; `peak_mb()` is the peak since then, and `kind` says what it is."""

    device: torch.device
    kind: str = ""

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "gpu_allocated"
            return self
        if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)
        try:
            _CLEAR_REFS.write_text("5")
            self.kind = "rss_run" if _status_kib("VmHWM") is not None else "rss_process"
        except OSError:  # not Linux, or /proc not writable: the process's peak is all there is
            self.kind = "rss_process"
        return self

    def peak_mb(self) -> float:
        if self.kind == "gpu_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "rss_run":
            return (_status_kib("VmHWM") or 0) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


KIND_LABELS = {
    "gpu_allocated": "peak GPU MB (allocated, this run)",
    "rss_run": "peak RSS MB (this run)",
    "rss_process": "peak RSS MB (whole process)",
}
