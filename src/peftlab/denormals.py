"""Flush denormal floats to zero in every thread that computes, not only the caller's.

x86 computes with values below 1.2e-38 (denormals) on a slow microcode path. A randomly
initialised model's softmax puts them in the logits' gradient, and Adam's squared gradients
underflow into them: the matrix product with the LM head weights took 62 ms instead of 6 ms
on this project's CPU. `torch.set_flush_denormal` sets the flag for the calling thread
only; the OpenMP worker threads that compute the rest of every matrix product and large
elementwise kernel keep the flag they were started with (a thread inherits it from its
creator, and the pool starts at the first parallel operation). torch has no call that
reaches them, so `set_flush_denormal` runs torch's own setter once on every thread of the
pool, through OpenMP's `GOMP_parallel` entry point (exported by libgomp, and for
compatibility by LLVM's libomp and Intel's libiomp) of the runtime torch's kernels use.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

_TASK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_OPENMP_NAMES = ("libgomp", "libomp", "libiomp")


def _loaded_openmp_libraries() -> list[str]:
    """OpenMP runtimes mapped into this process (Linux; empty elsewhere), torch's own first.

    Other wheels bring their own copies (sentencepiece's libgomp): each runs its own thread
    pool, and reaching that pool does nothing for torch's.
    """
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split(maxsplit=5)[-1] for line in lines if line.count(" ") >= 5}
    torch_dir = str(Path(torch.__file__).parent)
    return sorted((p for p in paths if Path(p).name.startswith(_OPENMP_NAMES)),
                  key=lambda p: (not p.startswith(torch_dir), p))


def _every_thread_flushes() -> bool:
    """Whether a kernel split across all intra-op threads flushes its denormal inputs."""
    denormals = torch.zeros(1 << 20)
    denormals.view(torch.int32)[:] = 5  # the bit pattern of a positive denormal
    return bool(((denormals * 1.0).view(torch.int32) == 0).all())


def _on_every_thread(parallel: ctypes._CFuncPtr, on: bool) -> None:
    task = _TASK(lambda _: torch.set_flush_denormal(on))  # runs once on each pool thread
    parallel(task, None, torch.get_num_threads(), 0)


@functools.cache
def _torch_pool_entry() -> ctypes._CFuncPtr | None:
    """`GOMP_parallel` of the runtime whose pool runs torch's kernels, found by its effect:
    with flushing on there, a kernel split across torch's threads flushes all its inputs.
    Leaves flushing on in the calling thread (the caller sets it next)."""
    torch.set_flush_denormal(True)
    for path in [*_loaded_openmp_libraries(), None]:  # None: symbols already global
        try:
            parallel = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        parallel.argtypes = [_TASK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        parallel.restype = None
        _on_every_thread(parallel, True)
        if _every_thread_flushes():
            return parallel
        _on_every_thread(parallel, False)  # another library's pool: leave it as it was
    return None


def set_flush_denormal(on: bool) -> bool:
    """Set flush-to-zero in the calling thread and every thread of torch's OpenMP pool.

    Returns False where the CPU has no such mode (then nothing changes). Where no runtime
    reaches torch's pool, only the calling thread changes, as with `torch.set_flush_denormal`.
    """
    parallel = _torch_pool_entry() if torch.get_num_threads() > 1 else None
    if not torch.set_flush_denormal(on):
        return False
    if parallel is not None:
        _on_every_thread(parallel, on)
    return True


_depth = 0  # nested blocks: only the outermost one sets and restores


@contextlib.contextmanager
def flushed_denormals() -> Iterator[None]:
    """Flush denormals to zero inside the block in every compute thread; restore on exit.

    Flushing changes no loss or metric above float rounding (values below 1e-38 become 0;
    on a GPU it touches only host-side arithmetic). The setting is process-wide (it also
    changes numpy's), hence scoped; blocks nest (training calls validation).
    """
    global _depth
    if _depth == 0:
        set_flush_denormal(True)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            set_flush_denormal(False)
