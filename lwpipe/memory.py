"""What the process hands back to the system: glibc keeps freed heap pages unless told otherwise.

A large model's run allocates and frees model-sized work (a layer's float32 levels, a decoded table, an
evaluation's computed weights) again and again; glibc serves blocks under its (rising) mmap threshold from
its heap and keeps their pages when they are freed, so the process's RSS climbs to the sum of what it once
held rather than what it holds. For large models the runner therefore maps every block of MMAP_THRESHOLD
bytes or more on its own (returned to the system when freed), and frees the heap's spare pages between
blocks and after each record (release_freed_memory). Elsewhere (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import gc

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 4 << 20
LARGE_MODEL_BYTES = 256 << 20  # models from this size on: large blocks mapped on their own


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the allocator's freed pages back to the system (glibc malloc_trim): each block's Hessians and
    GPTQ's float32 work tensors are freed, but without it the process keeps their pages and its RSS creeps
    up block after block."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_allocations(model_bytes: int) -> bool:
    """For a model of at least LARGE_MODEL_BYTES: blocks of MMAP_THRESHOLD bytes or more get their own
    mapping (a fixed threshold: glibc's own rises to 32 MB and then keeps such blocks in its heap).
    Whether it was set."""
    libc = _libc()
    if libc is None or model_bytes < LARGE_MODEL_BYTES:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
