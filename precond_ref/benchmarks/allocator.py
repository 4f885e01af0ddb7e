"""What the process's C allocator does with freed memory: ``bench --malloc``.

An eager optimizer step written as array expressions makes a fresh array for every result. On a GPU
the framework's caching allocator hands back a block freed a moment ago. On a CPU, torch and NumPy
ask the C library's ``malloc``, and glibc gives a freed block larger than ``M_MMAP_THRESHOLD``
back to the operating system (the threshold starts at 128 KiB and follows the blocks freed up to
32 MiB) and trims the top of its heap beyond ``M_TRIM_THRESHOLD``: the next array of that size is
fresh memory, and the kernel zeroes each of its 4 KiB pages on first touch (one page fault each,
microseconds apiece in a virtual machine). A step over a 16 MiB factor stack then spends more time
in page faults than in arithmetic, which no GPU and no caching allocator (jemalloc, tcmalloc:
PyTorch's CPU performance guide recommends either) pays, and which the cost model's copy rate, timed
into a buffer already in place, does not include.

``keep_freed_memory`` sets both thresholds so that freed blocks below :data:`KEEP_BELOW` stay in the
process; the same from the shell, for any training script, is ``MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=2147483647`` (docs/performance-archive.md has the measured effect).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

__all__ = ["KEEP_BELOW", "keep_freed_memory", "glibc"]

#: bytes: a freed block smaller than this stays in the process (``M_MMAP_THRESHOLD``)
KEEP_BELOW = 1 << 30
_TRIM_NEVER = 2**31 - 1  # M_TRIM_THRESHOLD takes an int: the largest, so the heap top is not trimmed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>


def glibc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version``), else ``None``."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc


def keep_freed_memory() -> Optional[str]:
    """``mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)`` and ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``:
    freed blocks below 1 GiB stay in this process for the next allocation. Returns what was set, as
    bench reports it, or ``None`` where the C library is not glibc or refuses a setting (then
    nothing is changed that matters: the allocator behaves as before)."""
    libc = glibc()
    if libc is None:
        return None
    if libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) != 1:
        return None
    version = libc.gnu_get_libc_version().decode()
    return f"glibc {version} malloc keeping freed blocks below {KEEP_BELOW / 2**30:g} GiB (--malloc keep)"
