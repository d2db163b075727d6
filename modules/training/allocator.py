"""glibc malloc settings for the training process: keep freed memory for the next step.

A training step allocates and frees the same few hundred activation and gradient buffers, many of them megabytes
large. With glibc's defaults, buffers above the (adaptive) mmap threshold go back to the kernel when freed, and
free memory at the top of the heap is trimmed, so each step faults the same pages in again and the kernel zeroes
them. Raising the mmap threshold to 32 MiB, the trim threshold to 1 GiB and padding heap growth by 256 MiB keeps
that memory in the process: a resident size near the peak of a step, for a steady ~2% more tokens/s on a 2-core
CPU (`python bench/training.py` runs the job with it). Elsewhere (not Linux, not glibc) nothing changes.
"""
from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 256 << 20}


def keep_freed_memory() -> bool:
    """Apply SETTINGS through mallopt; True when glibc took all of them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())
    if not taken:
        log.warning("glibc refused a malloc setting; training runs with its defaults")
    return taken
