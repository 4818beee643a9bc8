"""Run a command and report its wall time and the peak memory of its whole process tree.

``prepare`` and ``train --nproc N`` fork workers/ranks, so the RSS of the launched process alone
(``/usr/bin/time``, ``ru_maxrss``) misses most of the memory. This tool samples ``/proc`` every
``--interval`` seconds, finds every live descendant of the command (``/proc/<pid>/stat`` ppid
links, rebuilt at every sample so forks and exits are followed) and sums

* ``rss``: ``VmRSS`` of each process (resident pages; pages shared between a forked parent and its
  children are counted once per process, so this is an upper bound of the physical memory used), and
* ``pss``: ``Pss`` from ``/proc/<pid>/smaps_rollup`` (shared pages divided among their sharers: sums
  to the physical memory the tree holds; needs Linux >= 4.14).

``cpu_s`` is the user + system CPU time of the whole tree (``RUSAGE_CHILDREN``: every descendant
that was waited for, which pool workers and ranks are), a figure that other load on the machine
barely changes: ``cpu_s / cores`` is the wall time the command needs on that many idle cores if it
keeps them all busy (a lower bound otherwise).

Both include file-backed pages a process has mapped (memory-mapped inputs: reclaimable page
cache, not heap); anonymous memory alone (``RssAnon``, ``Pss_Anon``) is not reported yet.

The reported peaks are the maxima of those sums over the samples (a spike shorter than the
interval can be missed). No cgroup, no root needed. Writes one JSON line to ``--json`` (and
stdout): ``cmd, rc, wall_s, cpu_s, peak_rss_sum_mb, peak_pss_sum_mb, peak_processes, samples,
load_before/after`` (``/proc/loadavg``, 1-minute figure; the machine may be shared).

Example::

    python tools/measure_tree.py --json out.json -- python -m ctnocvr_rec.cli data prepare ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _children_map() -> dict[int, list[int]]:
    """ppid -> [pid] of every process visible in /proc now."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited between listdir and open
            continue
        # field 2 (comm) may contain spaces and parentheses: ppid is the 2nd field after the last ')'
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _kb(path: str, key: bytes) -> int:
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_memory_mb(root: int) -> tuple[float, float, int]:
    """(sum of VmRSS, sum of Pss, number of processes) of ``root``'s tree, in MB (10^6 bytes)."""
    pids = tree_pids(root)
    rss = sum(_kb(f"/proc/{p}/status", b"VmRSS:") for p in pids)
    pss = sum(_kb(f"/proc/{p}/smaps_rollup", b"Pss:") for p in pids)
    return rss * 1024 / 1e6, pss * 1024 / 1e6, len(pids)


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def measure(cmd: list[str], interval: float = 0.2) -> dict[str, object]:
    """Run ``cmd`` to completion, sampling its tree; returns the figures (see module docstring)."""
    load_before = _load()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak_rss = peak_pss = 0.0
    peak_n = samples = 0
    while proc.poll() is None:
        rss, pss, n = tree_memory_mb(proc.pid)
        peak_rss, peak_pss, peak_n = max(peak_rss, rss), max(peak_pss, pss), max(peak_n, n)
        samples += 1
        time.sleep(interval)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(wall, 2), "cpu_s": round(cpu, 1),
            "peak_rss_sum_mb": round(peak_rss, 1), "peak_pss_sum_mb": round(peak_pss, 1),
            "peak_processes": peak_n, "samples": samples, "interval_s": interval,
            "load_before": load_before, "load_after": _load()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    p.add_argument("--json", default="", help="append the result as one JSON line to this file")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command ...")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given (put it after --)")
    result = measure(cmd, args.interval)
    line = json.dumps(result)
    print(line, file=sys.stderr)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return int(result["rc"])  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
