"""The full-shape rehearsal tools: tools/make_fullshape.py writes raw files prepare accepts whole,
with the intended shape; tools/measure_tree.py counts the memory of forked descendants and tells
anonymous memory from memory-mapped files and shared memory."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from ctnocvr_rec.data import prepare as prep
from ctnocvr_rec.data.prepared import PreparedSet

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_make_fullshape_prepares_whole_with_the_full_shape(tmp_path: Path) -> None:
    fullshape = _tool("make_fullshape")
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    assert fullshape.main(["--out", str(raw), "--scale", "0.0001", "--block-requests", "32"]) == 0
    manifest = prep.prepare(prep.PrepareOptions(str(raw), str(out), workers=1, progress=False))
    rows_train, rows_test = round(42_300_000 * 1e-4), round(43_000_000 * 1e-4)
    rejects = manifest["rejects"]
    assert rejects["rows_rejected"] == 0 and rejects["common_rows_rejected"] == 0
    assert rejects["rows_in"] == rows_train + rows_test
    assert sum(manifest["splits"][s]["rows"] for s in ("train", "valid")) == rows_train
    assert manifest["splits"]["test"]["rows"] == rows_test
    # every request's histories land on its rows: ~509 history ids per row (+9 single user ids)
    # (stored once per request, the default layout: joined back onto the rows here)
    assert set(fullshape.HISTORY_MEAN) <= set(manifest["per_request"]["fields"])
    table = PreparedSet.open(out).read_table("train")
    per_row = sum(pc.list_value_length(table.column(h)).to_numpy() for h in fullshape.HISTORY_MEAN)
    assert 430 < per_row.mean() < 590, per_row.mean()
    # the manifest's ids per row (the planner's pooling factors) are the joined rows' means
    recorded = manifest["per_request"]["ids_per_row"]["train"]
    for h in fullshape.HISTORY_MEAN:
        assert recorded[h] == pytest.approx(pc.list_value_length(table.column(h)).to_numpy().mean()), h
    # rows per request ~ REAL_ROWS / REAL_REQUESTS (58), every request used, ids Zipf-skewed
    requests = np.unique(table.column("request_id").to_numpy())
    assert len(requests) > 0.9 * round(730_000 * 1e-4)
    item_counts = np.unique(pc.list_flatten(table.column("205")).to_numpy(), return_counts=True)[1]
    assert item_counts.max() > 20 * np.median(item_counts)


def test_request_sizes_sum_exactly() -> None:
    fullshape = _tool("make_fullshape")
    sizes = fullshape.request_sizes(10_000, 170, np.random.default_rng(0))
    assert sizes.sum() == 10_000 and sizes.min() >= 1 and len(sizes) == 170


CHILD = """
import multiprocessing as mp, time, numpy as np
def hold(_):
    a = np.ones(200_000_000 // 8)  # 200 MB touched in each of the 2 workers
    time.sleep(1.5)
    return 0
if __name__ == "__main__":
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(hold, [0, 1])
"""


def test_measure_tree_counts_forked_workers(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    measure_tree = _tool("measure_tree")
    cmd = [sys.executable, "-c", CHILD]
    whole = measure_tree.measure(cmd, interval=0.1)
    assert whole["rc"] == 0 and whole["peak_processes"] >= 3
    assert whole["peak_rss_sum_mb"] > 350 and whole["peak_pss_sum_mb"] > 350, whole  # 2 x 200 MB in workers
    assert whole["peak_rss_anon_sum_mb"] > 350 and whole["peak_pss_anon_sum_mb"] > 350, whole  # heap: anonymous
    # the negative control: the launched process alone (what ru_maxrss / time -v see) misses them
    monkeypatch.setattr(measure_tree, "tree_pids", lambda root: [root])
    alone = measure_tree.measure(cmd, interval=0.1)
    assert alone["peak_rss_sum_mb"] < 200, alone


def test_measure_tree_per_process_peaks_name_each_worker() -> None:
    """``--per-process``: each pool worker (depth 1, its parent the command) has its own 200 MB peak,
    the command's own process not."""
    measure_tree = _tool("measure_tree")
    m = measure_tree.measure([sys.executable, "-c", CHILD], interval=0.1, per_process=True)
    procs = m["per_process"]
    root = [p for p in procs if p["depth"] == 0]
    workers = [p for p in procs if p["depth"] == 1 and p["peak_rss_anon_mb"] > 150]
    assert len(root) == 1 and root[0]["peak_rss_anon_mb"] < 150, procs
    assert len(workers) == 2 and all(w["ppid"] == root[0]["pid"] for w in workers), procs
    assert all(w["first_s"] <= w["last_s"] for w in procs), procs
    assert "per_process" not in measure_tree.measure([sys.executable, "-c", "pass"], interval=0.1)


def test_measure_tree_cli_returns_the_commands_exit_code(tmp_path: Path) -> None:
    out = tmp_path / "m.jsonl"
    rc = subprocess.run([sys.executable, str(TOOLS / "measure_tree.py"), "--json", str(out), "--",
                         sys.executable, "-c", "raise SystemExit(3)"], capture_output=True).returncode
    assert rc == 3 and '"rc": 3' in out.read_text()


MAPPED = """
import mmap, sys, time, numpy as np
with open(sys.argv[1], "rb") as f:  # a 250 MB file, every page read: file-backed, not anonymous
    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
assert int(np.frombuffer(data, np.uint8)[::4096].sum()) == 0
shared = mmap.mmap(-1, 100_000_000)  # 100 MB shared anonymous, every page written: shmem
np.frombuffer(shared, np.uint8)[::4096] = 1
time.sleep(1.0)
"""


def test_measure_tree_tells_anonymous_memory_from_mapped_files(tmp_path: Path) -> None:
    measure_tree = _tool("measure_tree")
    data = tmp_path / "zeros.bin"
    data.write_bytes(bytes(250_000_000))
    m = measure_tree.measure([sys.executable, "-c", MAPPED, str(data)], interval=0.1)
    assert m["rc"] == 0 and m["peak_rss_sum_mb"] > 340 and m["peak_pss_sum_mb"] > 340, m
    assert m["peak_rss_anon_sum_mb"] < 100 and m["peak_pss_anon_sum_mb"] < 100, m  # the interpreter + numpy
    assert 95 < m["peak_rss_shmem_sum_mb"] < 110 and 95 < m["peak_pss_shmem_sum_mb"] < 110, m


def test_tree_memory_skips_exited_processes_and_nulls_a_figure_the_kernel_lacks(monkeypatch) -> None:  # noqa: ANN001
    measure_tree = _tool("measure_tree")
    files = {  # pid 1: a kernel without Pss_Anon / Pss_Shmem; pid 2: a zombie; pid 3: gone
        "/proc/1/status": {b"VmRSS:": 1000, b"RssAnon:": 600, b"RssShmem:": 100},
        "/proc/1/smaps_rollup": {b"Pss:": 900},
        "/proc/2/status": {}, "/proc/2/smaps_rollup": {}, "/proc/3/status": None, "/proc/3/smaps_rollup": None,
    }
    monkeypatch.setattr(measure_tree, "tree_pids", lambda root: [1, 2, 3])
    monkeypatch.setattr(measure_tree, "_read_kb", lambda path, keys: files[path])
    sums, n = measure_tree.tree_memory_mb(1)
    assert n == 3 and (sums["rss"], sums["rss_anon"], sums["rss_shmem"], sums["pss"]) == (1.024, 0.6144, 0.1024, 0.9216)
    assert sums["pss_anon"] is None and sums["pss_shmem"] is None
