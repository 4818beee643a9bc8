"""Host allocator tuning: glibc serves large blocks from the heap afterwards, and bad values are refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ctnocvr_rec.train.allocator import tune_host_allocator

# In a fresh interpreter: malloc 64 MiB, and report whether the block lies in the [heap] mapping.
_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from ctnocvr_rec.train.allocator import tune_host_allocator
    if sys.argv[1] == "tuned":
        assert tune_host_allocator()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    ptr = libc.malloc(64 << 20)
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= ptr < hi:
            print("heap" if line.rstrip().endswith("[heap]") else "mmap")
            break
    """
)


def _where_64mib_block_lives(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_serves_large_blocks_from_the_heap() -> None:
    # glibc's default sends a 64 MiB block to its own mmap; after tuning it comes from the heap,
    # so freeing and re-allocating it each step costs no page faults.
    assert _where_64mib_block_lives("default") == "mmap"
    assert _where_64mib_block_lives("tuned") == "heap"


def test_values_outside_a_c_int_are_refused() -> None:
    with pytest.raises(ValueError, match="M_MMAP_THRESHOLD"):
        tune_host_allocator(mmap_threshold=1 << 32)
    with pytest.raises(ValueError, match="M_TOP_PAD"):
        tune_host_allocator(top_pad=-1)
