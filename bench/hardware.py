"""What the benchmarks need to know of the machine's caches.

A timing that means to measure memory must read more bytes than the last-level cache
holds, or it measures the cache. ``last_level_cache`` says how large that cache is and
where the number came from, so that a results row can say both.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# assumed when neither sysfs nor sysconf answers: larger than the last-level cache of most
# single-socket machines, so that caches sized from it still stream from memory
FALLBACK_LLC_BYTES = 256 * 2**20
SYSFS_CPU = Path("/sys/devices/system/cpu")


def parse_size(text: str) -> int:
    """Bytes in a sysfs cache size such as ``32768K`` or ``1M``."""
    text = text.strip()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    return int(text.rstrip("KMGkmg")) * scale


def sysfs_llc_bytes(cpus: set[int], root: Path = SYSFS_CPU) -> int | None:
    """Bytes of the highest-level data or unified caches serving ``cpus``, each counted once.

    A machine with several last-level caches (one per socket, or per AMD core complex)
    spreads a multi-threaded kernel over all of them, so their sizes add up.
    """
    caches: dict[tuple[int, str], int] = {}  # (level, cpus sharing it) -> bytes
    for cpu in sorted(cpus):
        for index in sorted((root / f"cpu{cpu}" / "cache").glob("index*")):
            try:
                if (index / "type").read_text().strip() == "Instruction":
                    continue
                level = int((index / "level").read_text())
                shared = (index / "shared_cpu_list").read_text().strip()
                caches[(level, shared)] = parse_size((index / "size").read_text())
            except (OSError, ValueError):
                continue
    if not caches:
        return None
    top = max(level for level, _ in caches)
    return sum(size for (level, _), size in caches.items() if level == top)


def last_level_cache(device: torch.device) -> tuple[int, str]:
    """Bytes of the cache between ``device``'s compute and its memory, and their source.

    CUDA: the GPU's L2 (``torch.cuda.get_device_properties().L2_cache_size``). CPU: the
    highest cache level in sysfs, summed over the distinct caches of the CPUs this
    process may run on; else ``os.sysconf("SC_LEVEL3_CACHE_SIZE")`` (one cache); else
    ``FALLBACK_LLC_BYTES``.
    """
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size > 0:
            return size, "cuda L2_cache_size"
        return FALLBACK_LLC_BYTES, "fallback"
    if hasattr(os, "sched_getaffinity"):
        cpus = os.sched_getaffinity(0)
    else:
        cpus = set(range(os.cpu_count() or 1))
    size = sysfs_llc_bytes(cpus)
    if size:
        return size, "sysfs"
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError):
        size = 0
    if size > 0:
        return size, "sysconf"
    return FALLBACK_LLC_BYTES, "fallback"
