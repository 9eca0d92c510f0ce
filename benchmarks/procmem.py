"""This process's resident memory from /proc (Linux), for the benchmarks' peak-memory figures.

torch's CPU allocations bypass Python's allocator, so tracemalloc cannot see them; the kernel's
resident-set counters can. `reset_peak()` then `rss_kib("VmHWM") - before` is the peak of one
piece of work.
"""

from __future__ import annotations


def rss_kib(field: str = "VmRSS") -> int:
    """A memory field of /proc/self/status in KiB: VmRSS (now) or VmHWM (high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (writing 5 to clear_refs, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
