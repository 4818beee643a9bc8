"""Loader workers run under glibc's default heap limits, not the ones their rank raised for its step.

Checked by behaviour, in a fresh interpreter that tunes its allocator like a training rank
(``tune_host_allocator``) and then forks one DataLoader worker: where a 48 MiB ``malloc`` lands
(``[heap]`` or its own mapping, from ``/proc/self/maps``: the mmap threshold, 1 GiB tuned, 32 MiB in
a worker) and how much free memory the main heap keeps at its top after 2 MiB of smaller blocks are
freed (``mallinfo2().keepcost``: the trim threshold and top pad; tuned >= the 256 MiB pad, in a
worker at most the 64 MiB trim threshold).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    from torch.utils.data import DataLoader, IterableDataset
    from ctnocvr_rec.data.dataset import _worker_init
    from ctnocvr_rec.train.allocator import tune_host_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2

    def probe():
        ptr = libc.malloc(48 << 20)
        where = "unmapped"
        for line in open("/proc/self/maps"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                where = "heap" if line.rstrip().endswith("[heap]") else "mmap"
        libc.free(ptr)
        blocks = [libc.malloc(64 << 10) for _ in range(32)]
        for b in reversed(blocks):
            libc.free(b)
        return {"block_48mib": where, "keepcost": libc.mallinfo2().keepcost}

    class Probe(IterableDataset):
        def __iter__(self):
            yield probe()

    assert tune_host_allocator()
    parent = probe()
    init = _worker_init if sys.argv[1] == "worker_init" else None
    loader = DataLoader(Probe(), batch_size=None, num_workers=1, worker_init_fn=init,
                        multiprocessing_context="fork")
    worker = next(iter(loader))
    print(json.dumps({"parent": parent, "worker": worker, "parent_after": probe()}))
    """
)


def _probe(mode: str) -> dict[str, dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or platform.libc_ver()[1] < "2.33",
                    reason="glibc mallopt and mallinfo2 (glibc >= 2.33)")
def test_loader_worker_runs_under_glibc_default_heap_limits() -> None:
    reset = _probe("worker_init")
    # the rank: tuned (48 MiB from the heap, >= 128 MiB kept free at the top: the 256 MiB pad), before and after
    for state in (reset["parent"], reset["parent_after"]):
        assert state["block_48mib"] == "heap" and int(state["keepcost"]) >= 128 << 20, reset  # type: ignore[call-overload]
    # its worker, after _worker_init: 48 MiB is mmapped (threshold 32 MiB), the heap top trimmed (64 MiB, pad 0)
    assert reset["worker"]["block_48mib"] == "mmap", reset
    assert int(reset["worker"]["keepcost"]) < 64 << 20, reset  # type: ignore[call-overload]
    # the probe tells the two apart: a worker without _worker_init keeps the rank's settings
    inherited = _probe("none")["worker"]
    assert inherited["block_48mib"] == "heap" and int(inherited["keepcost"]) >= 128 << 20, inherited  # type: ignore[call-overload]
