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
    from ctnocvr_rec.data.dataset import _worker_init, _worker_init_releasing
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
    init = {"releasing": _worker_init_releasing, "training": _worker_init, "none": None}[sys.argv[1]]
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
def test_evaluation_loader_worker_runs_under_glibc_default_heap_limits() -> None:
    reset = _probe("releasing")
    # the rank: tuned (48 MiB from the heap, >= 128 MiB kept free at the top: the 256 MiB pad), before and after
    for state in (reset["parent"], reset["parent_after"]):
        assert state["block_48mib"] == "heap" and int(state["keepcost"]) >= 128 << 20, reset  # type: ignore[call-overload]
    # its worker, after _worker_init_releasing: 48 MiB is mmapped (threshold 32 MiB), the heap top trimmed (64 MiB, pad 0)
    assert reset["worker"]["block_48mib"] == "mmap", reset
    assert int(reset["worker"]["keepcost"]) < 64 << 20, reset  # type: ignore[call-overload]
    # the probe tells the two apart: a worker without it keeps the rank's settings; so does a training
    # loader's worker (_worker_init), on purpose: there the reset cost 6-15% of training samples/s
    for mode in ("none", "training"):
        inherited = _probe(mode)["worker"]
        assert inherited["block_48mib"] == "heap" and int(inherited["keepcost"]) >= 128 << 20, (mode, inherited)  # type: ignore[call-overload]


def test_only_evaluation_loaders_release_worker_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's evaluation loaders run their workers under the releasing init, its training
    loader under the plain one (which keeps the rank's tuned heap: faster steps on few cores)."""
    import torch

    from ctnocvr_rec.config import RunConfig
    from ctnocvr_rec.data.dataset import _worker_init, _worker_init_releasing
    from ctnocvr_rec.train.data_source import TrainData, open_eval_batches
    from ctnocvr_rec.train.distributed import DistContext
    from ctnocvr_rec.train.testing import write_tiny_prepared

    cfg = RunConfig()
    cfg.data.prepared_dir = str(write_tiny_prepared(tmp_path / "prepared", {"train": 64, "test": 64}))
    cfg.data.num_workers = 1
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"), "gloo", None, False)
    seen: list[object] = []

    class Recording:  # stands in for torch's DataLoader: records the worker init it is given
        def __init__(self, *args: object, worker_init_fn: object = None, **kwargs: object) -> None:
            seen.append(worker_init_fn)

        def __iter__(self):
            return iter(())

    import ctnocvr_rec.data.dataset as dataset_mod

    monkeypatch.setattr(dataset_mod, "DataLoader", Recording)
    list(TrainData(cfg, ctx).epoch_batches(0))
    list(open_eval_batches(cfg, ctx, "test"))  # type: ignore[arg-type]
    assert seen == [_worker_init, _worker_init_releasing], seen
