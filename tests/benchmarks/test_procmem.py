"""The benchmarks' peak-memory reading sees memory that torch allocates outside Python's allocator."""

from __future__ import annotations

import torch

from benchmarks.procmem import reset_peak, rss_kib


def test_the_peak_of_one_piece_of_work():
    reset_peak()
    before = rss_kib("VmRSS")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident
    peak = rss_kib("VmHWM") - before
    del block
    assert peak >= 60 * 1024  # KiB; allocator slack aside, the whole block was resident
    reset_peak()
    assert rss_kib("VmHWM") - rss_kib("VmRSS") < 60 * 1024  # the reset forgot it
