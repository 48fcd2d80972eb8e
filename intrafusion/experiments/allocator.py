"""The process's memory allocator, set for evaluating in large batches."""
from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def release_large_buffers(threshold: int = 1 << 20) -> bool:
    """Have glibc's malloc serve every allocation of `threshold` bytes or more with its own
    mapping, so that a freed activation buffer goes back to the system at once; True if set.

    By default glibc raises that threshold (up to 32 MiB) each time such a buffer is freed, after
    which buffers of that size come from the heap, where the small allocations living between
    them keep freed space from being returned or reused: resident memory then grows with every
    evaluation batch (ResNet18's grid on the Fashion-MNIST test set: a 10-batch pass of 10 cells
    peaked at 2,317 MiB and kept growing; with this, 1,750 MiB, flat after the first batch, at the
    same CPU time). No effect, False, where the C library is not glibc (macOS, musl)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold) == 1
    except (OSError, AttributeError):
        return False
