"""Give memory back to the operating system when a model is unloaded.

glibc keeps freed heap memory for reuse, so after unloading a model of a few hundred MB the process could stay
that much larger and a swap A -> B would cost A + B. Weights are therefore allocated with mmap (the allocator's
threshold is lowered while a model loads), so freeing them unmaps them at once, and malloc_trim returns what the
heap holds free after an unload. Both are no-ops where glibc is not the allocator.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_M_MMAP_THRESHOLD = -3
_WEIGHTS_THRESHOLD = 1 << 20  # tensors of 1 MiB and more get their own mapping while loading
_RUNNING_THRESHOLD = 32 << 20  # glibc's own ceiling: generation temporaries stay on the fast heap


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def weights_in_mmap() -> Iterator[None]:
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _WEIGHTS_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _RUNNING_THRESHOLD)


def release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
