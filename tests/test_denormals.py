"""Denormal flushing reaches every thread that computes (issue 4's CPU speed)."""

import pytest
import torch

from peftlab.denormals import flushed_denormals, set_flush_denormal

pytestmark = pytest.mark.skipif(not torch.set_flush_denormal(False),
                                reason="no flush-to-zero mode on this CPU")


@pytest.fixture
def two_threads():
    """Two intra-op threads, so that a large kernel is split between the caller and a worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def flushed_fraction() -> float:
    """Share of a product of denormals that came out as zero (1.0: flushed everywhere)."""
    denormals = torch.zeros(1_000_000)
    denormals.view(torch.int32)[:] = 5  # the bit pattern of a positive denormal
    return ((denormals * 1.0).view(torch.int32) == 0).float().mean().item()


def test_flush_reaches_the_worker_threads(two_threads):
    flushed_fraction()  # the worker threads exist before the flag is set
    torch.set_flush_denormal(True)
    caller_only = flushed_fraction()
    torch.set_flush_denormal(False)
    # Why the module exists; if a torch release fixes its setter, the module can go.
    assert caller_only < 1.0
    with flushed_denormals():
        assert flushed_fraction() == 1.0
    assert flushed_fraction() == 0.0


def test_nested_blocks_keep_flushing_until_the_outermost_ends(two_threads):
    with flushed_denormals():
        with flushed_denormals():
            pass
        assert flushed_fraction() == 1.0
    assert flushed_fraction() == 0.0
    assert set_flush_denormal(False)


def test_another_librarys_openmp_pool_is_not_taken_for_torchs(two_threads, monkeypatch):
    """sentencepiece's wheel brings its own libgomp; listed first, it must be passed over."""
    pytest.importorskip("sentencepiece")
    from peftlab import denormals

    runtimes = denormals._loaded_openmp_libraries()
    if len(runtimes) < 2:
        pytest.skip("only one OpenMP runtime loaded")
    monkeypatch.setattr(denormals, "_loaded_openmp_libraries", lambda: runtimes[::-1])
    denormals._torch_pool_entry.cache_clear()
    try:
        with flushed_denormals():
            assert flushed_fraction() == 1.0
        assert flushed_fraction() == 0.0
    finally:
        denormals._torch_pool_entry.cache_clear()
