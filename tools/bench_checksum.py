"""Cost of checkpoint checksums: seconds per GiB of ``file_digest`` (sha256) and of verifying a folder.

    python tools/bench_checksum.py [--gib 1] [--files 4] [--dir /tmp]

Writes ``--files`` random files totalling ``--gib`` GiB into a temp folder under ``--dir``, then times
(1) hashing them one after the other (what one rank does for its own files, from the page cache right
after writing them) and (2) :func:`verify_checkpoint` of the folder with 1 and with all threads (what
``--resume`` / ``ctnocvr eval`` / ``ctnocvr checkpoint verify`` do). Cold-cache reads add the disk's
read time on top; drop the page cache yourself to see it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ctnocvr_rec.train import checkpoint_integrity as integrity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_checksum_", dir=args.dir)) / "step-1"
    folder.mkdir()
    try:
        per_file = int(args.gib * (1 << 30)) // args.files
        block = os.urandom(1 << 24)
        for i in range(args.files):
            with open(folder / f"__{i}_0.distcp", "wb") as f:
                for _ in range(per_file // len(block)):
                    f.write(block)
        total = sum(p.stat().st_size for p in folder.iterdir())
        gib = total / (1 << 30)
        t, cpu = time.perf_counter(), time.process_time()
        manifest = {p.name: integrity.file_digest(p) for p in sorted(folder.iterdir())}
        serial, serial_cpu = time.perf_counter() - t, time.process_time() - cpu
        (folder / integrity.META_FILE).write_text(json.dumps(integrity.seal_meta({"step": 1, "world_size": 1},
                                                                                 manifest)))
        timings = {}
        for threads in sorted({1, min(8, os.cpu_count() or 1)}):
            t, cpu = time.perf_counter(), time.process_time()
            status = integrity.verify_checkpoint(folder, threads=threads)
            timings[threads] = (time.perf_counter() - t, time.process_time() - cpu)
            assert status.state == "intact", status.problems
        # CPU seconds are the cost itself; wall seconds also depend on what else the machine runs
        print(f"{gib:.2f} GiB in {args.files} files, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print(f"hash at save, 1 thread:  {serial / gib:.2f} s/GiB wall, {serial_cpu / gib:.2f} CPU-s/GiB")
        for threads, (wall, cpu_s) in timings.items():
            print(f"verify, {threads} thread(s):    {wall / gib:.2f} s/GiB wall, {cpu_s / gib:.2f} CPU-s/GiB")
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
