"""The process's memory allocator, set for evaluating in large batches."""
from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's <malloc.h>


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


def reuse_freed_buffers(keep: int = 2 ** 31 - 1) -> bool:
    """Have glibc's malloc serve every allocation from its heap and keep up to `keep` freed bytes
    (a C int) at its top, so that each evaluation batch's activation buffers reuse the pages of the batch before;
    True if set. Resident memory then stays at its peak (the largest working set, plus any
    fragmentation), which is what a run that ends after its last batch can afford.

    A buffer the C library maps afresh (any of 32 MiB or more, and with release_large_buffers
    any of 1 MiB or more) is zeroed by the kernel page by page when first written: measured on
    2 cores, the forward passes of VGG11-BN over 1,000 images in batches of 1,000 took 7.1 s of
    user and 2.5 s of system CPU time with release_large_buffers, 7.1 s and 0.01 s with this;
    `intrafusion compress` spent a quarter of its CPU time in the kernel before. No effect,
    False, where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, keep) == 1
    except (OSError, AttributeError):
        return False
