"""Host memory allocator settings for CPU training: keep big activation buffers in the heap.

Why: a CPU training step allocates and frees the same large tensors every step (activations and
gradients of ``[B, E*h]`` expert layers are 16-64 MiB at batch 4096). glibc serves blocks above its
mmap threshold (at most 32 MiB by default) with fresh ``mmap`` calls and returns them with ``munmap``,
and it trims the heap top whenever more than the trim threshold is free. Either way the next step
touches new pages and pays a page fault per 4 KiB, which costs as much as the arithmetic on these
tensors. Raising both thresholds lets the allocator reuse the same pages step after step. Measured
with ``tools/bench_train.py`` on this project's 2-core machine: 10-25 % more samples/s for MMoE at
the paper and the wide size (see ``docs/train.md``).

The settings are process-wide and only ever raise limits, so they are safe to apply more than once.
On a C library other than glibc (no ``mallopt``) nothing happens and :func:`tune_host_allocator`
returns ``False``. The price is resident memory: freed blocks below the thresholds stay mapped to the
process instead of going back to the OS, bounded by the peak the step needed anyway.
"""

from __future__ import annotations

import logging
import sys

from ctnocvr_rec.data.rawfiles import M_MMAP_THRESHOLD, M_TOP_PAD, M_TRIM_THRESHOLD, libc_function

log = logging.getLogger(__name__)

# mallopt takes a C int
_INT_MAX = 2**31 - 1

#: defaults applied by the trainer (bytes): blocks up to 1 GiB come from the heap, the heap is
#: trimmed only when 1 GiB is free at its top, and it grows in steps of at least 256 MiB
DEFAULT_MMAP_THRESHOLD = 1 << 30
DEFAULT_TRIM_THRESHOLD = 1 << 30
DEFAULT_TOP_PAD = 256 << 20


def tune_host_allocator(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
    top_pad: int = DEFAULT_TOP_PAD,
) -> bool:
    """Apply glibc ``mallopt`` settings for this process; ``True`` if all three were accepted.

    Args:
        mmap_threshold: blocks of at least this many bytes are served by ``mmap`` (glibc caps the
            default at 32 MiB; values above ``2**31 - 1`` are rejected, as ``mallopt`` takes an int).
        trim_threshold: free bytes at the heap top before glibc returns memory to the OS.
        top_pad: extra bytes requested whenever the heap grows.
    """
    settings = {"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, mmap_threshold),
                "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, trim_threshold),
                "M_TOP_PAD": (M_TOP_PAD, top_pad)}
    for name, (_, value) in settings.items():
        if not 0 <= value <= _INT_MAX:
            raise ValueError(f"{name} must be in [0, {_INT_MAX}] bytes (a C int), got {value}")
    if not sys.platform.startswith("linux"):
        return False
    mallopt = libc_function("mallopt")
    if mallopt is None:  # musl and other C libraries have no mallopt
        log.debug("no mallopt in this C library; host allocator left as is")
        return False
    accepted = {name: bool(mallopt(param, value)) for name, (param, value) in settings.items()}
    if not all(accepted.values()):
        log.warning("mallopt rejected %s; host allocator partly tuned", [n for n, ok in accepted.items() if not ok])
    return all(accepted.values())
