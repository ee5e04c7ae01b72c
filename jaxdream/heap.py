"""How a dreaming process manages memory: the C heap's treatment of what XLA frees (glibc's
malloc on Linux), and how often Python's collector runs.

An XLA call on CPU allocates its scratch memory afresh. glibc serves blocks above its mmap
threshold (at most 32 MB) with a fresh mapping and unmaps them when freed, so every call faulted
its scratch memory in again, page by page: a Lite0 tile program at 256 x 256 took 10,800 page
faults (42 MB) and 27 ms a call, against none and 12 ms with mappings off and the heap's top
kept (README, Speed). Imports nothing heavy, so the CLI sets it before JAX allocates anything.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

#: Environment variable: ``system`` leaves malloc's settings alone.
MALLOC_ENV = "JAXDREAM_MALLOC"

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameters (glibc's malloc.h)


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse (no mappings for large blocks, the
    heap's top never trimmed below 2 GB) instead of handing it back to the kernel; returns
    whether it did. The process then keeps its peak memory until it exits, which a dreaming
    process reaches with its first image anyway. Linux with glibc only; ``JAXDREAM_MALLOC=
    system`` opts out. The CLI's dreaming commands and the Ray workers call this; the Python
    API leaves its host process's heap alone.
    """
    if os.environ.get(MALLOC_ENV, "").strip().lower() == "system" or sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): its own behaviour stays
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


#: Python's collector thresholds in a dreaming process (3.11's defaults: 700, 10, 10). Tracing
#: a program allocates millions of short-lived objects, and the defaults ran a young
#: collection every 700 and full ones over every object JAX had made: tracing and lowering
#: Lite0's dream took 2.2-2.5 s against 2.7-3.2 s with the defaults (README, Speed).
COLLECTOR_THRESHOLDS = (100_000, 50, 100)


def set_up() -> None:
    """What the CLI's model commands and the Ray workers set before dreaming: freed memory
    kept (:func:`keep_freed_memory`) and Python's collector run less often
    (:data:`COLLECTOR_THRESHOLDS`). The Python API leaves its host process alone."""
    keep_freed_memory()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
