"""Memory: sizes as users write them, what the machine has free, the budget every stage keeps to."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import re
import resource
import sys

from ..errors import MixquantError

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, flag: str = "size") -> int:
    """'80MB', '76.5MiB', '1.2GB' or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    size = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()] if match else math.nan
    if not (math.isfinite(size) and size >= 1):
        raise MixquantError(f"{flag}: cannot read {text!r}; give bytes or a size like 800MB, 2GiB")
    return int(size)


def format_size(n: float) -> str:
    """Bytes as KiB, MiB or GiB, for messages."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def available_memory() -> int:
    """Bytes the machine has free now (MemAvailable; physical memory where /proc is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss() -> int:
    """This process's peak resident set size in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def budget_from(max_memory: int | str | None) -> int:
    """--max-memory as bytes (default: what the machine has free now)."""
    if max_memory is None:
        return available_memory()
    return max_memory if isinstance(max_memory, int) else parse_size(max_memory, "--max-memory")


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere).
    Freed activation buffers of a few MB otherwise stay in the heap (glibc raises its mmap threshold
    after each large free), and a block-by-block pass's RSS creeps up by tens of MB per block."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
