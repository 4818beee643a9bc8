"""Run a command and report its wall time and the peak memory of its whole process tree.

``prepare`` and ``train --nproc N`` fork workers/ranks, so the RSS of the launched process alone
(``/usr/bin/time``, ``ru_maxrss``) misses most of the memory. This tool samples ``/proc`` every
``--interval`` seconds, finds every live descendant of the command (``/proc/<pid>/stat`` ppid
links, rebuilt at every sample so forks and exits are followed) and sums

* ``rss``: ``VmRSS`` of each process (resident pages; pages shared between a forked parent and its
  children are counted once per process, so this is an upper bound of the physical memory used), and
* ``pss``: ``Pss`` from ``/proc/<pid>/smaps_rollup`` (shared pages divided among their sharers: sums
  to the physical memory the tree holds; needs Linux >= 4.14).

Both include file-backed pages a process has mapped (memory-mapped inputs, shared libraries:
reclaimable page cache, not heap), so the same two sums are also taken of

* anonymous memory: ``rss_anon`` (``RssAnon`` of ``/proc/<pid>/status``) and ``pss_anon``
  (``Pss_Anon`` of ``smaps_rollup``): private heap, numpy arrays, stacks; the memory the tree cannot
  give back without swap. Pages a forked child still shares with its parent count in each
  process's ``RssAnon`` (``Pss_Anon`` divides them);
* shared memory: ``rss_shmem`` / ``pss_shmem`` (``RssShmem`` / ``Pss_Shmem``): shared anonymous
  mappings, ``/dev/shm`` and other tmpfs files (torch passes tensors between processes there). Not
  in the anonymous figures and not reclaimable either.

``rss - rss_anon - rss_shmem`` is the file-backed part (``RssFile``). A figure this kernel does not
provide (``Pss_Anon`` / ``Pss_Shmem`` need Linux >= 5.7 or so) is reported as ``null``.

``cpu_s`` is the user + system CPU time of the whole tree (``RUSAGE_CHILDREN``: every descendant
that was waited for, which pool workers and ranks are), a figure that other load on the machine
barely changes: ``cpu_s / cores`` is the wall time the command needs on that many idle cores if it
keeps them all busy (a lower bound otherwise).

The reported peaks are the maxima of those sums over the samples (a spike shorter than the
interval can be missed). No cgroup, no root needed. Writes one JSON line to ``--json`` (and
stdout): ``cmd, rc, wall_s, cpu_s, peak_rss_sum_mb, peak_pss_sum_mb, peak_rss_anon_sum_mb,
peak_pss_anon_sum_mb, peak_rss_shmem_sum_mb, peak_pss_shmem_sum_mb, peak_processes, samples,
load_before/after`` (each peak the maximum of its own sum: they may come from different samples) (``/proc/loadavg``, 1-minute figure; the machine may be shared).
``--per-process`` adds ``per_process``: one entry per process ever seen (``pid, ppid, depth`` below
the command, seconds ``first_s`` / ``last_s`` it was seen, the tail of its command line, and its own
peaks of each figure, MB), so a DataLoader worker (depth 3 under ``train --nproc N``: launcher ->
``torch.distributed.run`` -> rank -> worker) can be told from its rank.

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
    return list(tree_parents(root))


def tree_parents(root: int) -> dict[int, tuple[int, int]]:
    """``root`` and all its live descendants: pid -> (ppid, depth below ``root``; root: (0, 0))."""
    kids = _children_map()
    out: dict[int, tuple[int, int]] = {}
    todo = [(root, 0, 0)]
    while todo:
        pid, ppid, depth = todo.pop()
        out[pid] = (ppid, depth)
        todo.extend((kid, pid, depth + 1) for kid in kids.get(pid, []))
    return out


#: figure -> (file under /proc/<pid>/, line key); values in kB
FIGURES = {
    "rss": ("status", b"VmRSS:"),
    "pss": ("smaps_rollup", b"Pss:"),
    "rss_anon": ("status", b"RssAnon:"),
    "pss_anon": ("smaps_rollup", b"Pss_Anon:"),
    "rss_shmem": ("status", b"RssShmem:"),
    "pss_shmem": ("smaps_rollup", b"Pss_Shmem:"),
}


def _read_kb(path: str, keys: list[bytes]) -> dict[bytes, int] | None:
    """The ``keys`` present in ``path`` (kB); None when the file cannot be read (the process exited)."""
    found: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                for key in keys:
                    if line.startswith(key):
                        found[key] = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return found


def tree_memory_mb(
    root: int, per_process: dict[int, dict[str, float | None]] | None = None, pids: list[int] | None = None,
) -> tuple[dict[str, float | None], int]:
    """Sums over ``root``'s tree of each of :data:`FIGURES`, in MB (10^6 bytes), and the number of processes.

    A process that exits between the listing and the read, or a zombie (its files have no memory
    lines), adds 0; a figure absent where the file's other figures are present (an older kernel) is None.
    ``per_process``, if given, receives each process's own figures of this sample (pid -> figure -> MB);
    ``pids``: the tree's processes if already listed.
    """
    pids = tree_pids(root) if pids is None else pids
    sums: dict[str, float | None] = dict.fromkeys(FIGURES, 0.0)
    for name in ("status", "smaps_rollup"):
        wanted = {fig: key for fig, (file, key) in FIGURES.items() if file == name}
        for pid in pids:
            found = _read_kb(f"/proc/{pid}/{name}", list(wanted.values()))
            if not found:
                continue
            for fig, key in wanted.items():
                value = found[key] * 1024 / 1e6 if key in found else None
                if per_process is not None:
                    per_process.setdefault(pid, {})[fig] = value
                if value is None:
                    sums[fig] = None
                elif sums[fig] is not None:
                    sums[fig] += value
    return sums, len(pids)


def _cmd_tail(pid: int, chars: int = 80) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[-chars:]
    except OSError:
        return ""


def _merge_process_peaks(
    procs: dict[int, dict[str, object]], sample: dict[int, dict[str, float | None]],
    parents: dict[int, tuple[int, int]], t: float,
) -> None:
    """Fold one sample's per-process figures into ``procs`` (pid -> record with the peaks so far)."""
    for pid, figs in sample.items():
        rec = procs.get(pid)
        if rec is None:
            ppid, depth = parents.get(pid, (0, -1))
            rec = procs[pid] = {"pid": pid, "ppid": ppid, "depth": depth, "first_s": round(t, 1),
                                "cmd": _cmd_tail(pid), **{f"peak_{fig}_mb": 0.0 for fig in FIGURES}}
        rec["last_s"] = round(t, 1)
        for fig, value in figs.items():
            old = rec[f"peak_{fig}_mb"]
            rec[f"peak_{fig}_mb"] = None if value is None or old is None else round(max(float(old), value), 1)  # type: ignore[arg-type]


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def measure(cmd: list[str], interval: float = 0.2, per_process: bool = False) -> dict[str, object]:
    """Run ``cmd`` to completion, sampling its tree; returns the figures (see module docstring)."""
    load_before = _load()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peaks: dict[str, float | None] = dict.fromkeys(FIGURES, 0.0)
    peak_n = samples = 0
    procs: dict[int, dict[str, object]] = {}
    while proc.poll() is None:
        sample: dict[int, dict[str, float | None]] | None = {} if per_process else None
        parents = tree_parents(proc.pid) if per_process else {}
        sums, n = tree_memory_mb(proc.pid, sample, list(parents) if per_process else None)
        if sample is not None:
            _merge_process_peaks(procs, sample, parents, time.perf_counter() - t0)
        for fig, value in sums.items():
            old = peaks[fig]
            peaks[fig] = None if value is None or old is None else max(old, value)
        peak_n = max(peak_n, n)
        samples += 1
        time.sleep(interval)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    result: dict[str, object] = {
        "cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(wall, 2), "cpu_s": round(cpu, 1),
        **{f"peak_{fig}_sum_mb": None if v is None else round(v, 1) for fig, v in peaks.items()},
        "peak_processes": peak_n, "samples": samples, "interval_s": interval,
        "load_before": load_before, "load_after": _load()}
    if per_process:
        result["per_process"] = sorted(procs.values(), key=lambda r: int(r["pid"]))  # type: ignore[call-overload]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    p.add_argument("--json", default="", help="append the result as one JSON line to this file")
    p.add_argument("--per-process", action="store_true",
                   help="also report each process's own peaks (pid, ppid, depth, first/last seen, command)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command ...")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given (put it after --)")
    result = measure(cmd, args.interval, args.per_process)
    line = json.dumps(result)
    print(line, file=sys.stderr)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return int(result["rc"])  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
