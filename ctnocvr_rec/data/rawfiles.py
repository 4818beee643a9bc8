"""Raw input files and output folders on disk: byte-range chunks, the UTF-8 byte order mark, and the
temporary folders of ``ctnocvr data prepare`` (naming and clean-up after a killed run).

Kept apart from :mod:`ctnocvr_rec.data.prepare` (the pipeline) because these rules are about files,
not rows; see ``docs/design.md`` ("Reader rules").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import shutil
import socket
from pathlib import Path
from typing import Any

UTF8_BOM = b"\xef\xbb\xbf"


def bom_length(path: str | Path) -> int:
    """3 when the file starts with a UTF-8 byte order mark (ignored, like the rest of line 1's
    position: byte offsets of rows are counted after it), else 0."""
    with open(path, "rb") as f:
        return len(UTF8_BOM) if f.read(len(UTF8_BOM)) == UTF8_BOM else 0


def chunk_ranges(path: str | Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about ``chunk_bytes`` that start at line starts and cover the file (after a
    leading UTF-8 byte order mark, which is not part of any line)."""
    size = os.path.getsize(path)
    ranges = []
    with open(path, "rb") as f:
        start = bom_length(path)
        while start < size:
            end = min(start + chunk_bytes, size)
            if end < size:
                f.seek(end)
                tail = f.readline()  # move the boundary to just after the next newline
                end += len(tail)
            ranges.append((start, end))
            start = end
    return ranges


def read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def temporary_folder(out: Path, kind: str) -> Path:
    """``.<out>.<kind>-<host>-<pid>`` next to ``out`` (kind ``tmp``: being built; ``old``: the previous
    output during the swap). Host and pid let a later run tell a dead run's folder from a live one."""
    return out.parent / f".{out.name}.{kind}-{HOST}-{os.getpid()}"


HOST = socket.gethostname().replace("-", "_").replace("/", "_") or "host"


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.<out>.tmp-<host>-<pid>`` folders (and legacy ``.tmp-<pid>``) of dead runs on this host.

    A killed ``prepare`` cannot clean up after itself. A folder is stale when its host is this host
    and no process ``pid`` exists; folders of live processes and of other hosts (a shared file
    system) are left alone. A ``.<out>.old-<host>-<pid>`` folder of a dead run is the previous good
    output, moved aside just before the swap: it is moved back when ``out`` is missing, else removed.
    Returns the folders removed or restored.
    """
    handled = []
    if not out.parent.is_dir():
        return handled
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        kind, _, tag = path.name[len(out.name) + 2 :].partition("-")
        host, _, pid_text = tag.rpartition("-")
        if kind not in ("tmp", "old") or not pid_text.isdigit() or host not in ("", HOST):
            continue
        if _pid_alive(int(pid_text)):
            continue
        if kind == "old" and not out.exists():
            path.rename(out)
        else:
            shutil.rmtree(path, ignore_errors=True)
        handled.append(path)
    return handled


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def release_free_memory() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``); False where there is no glibc.

    After the common table's big temporaries are freed, glibc keeps much of that memory in the
    process's heap (its mmap threshold grows with the sizes freed, so later large arrays come from
    the heap, which is only trimmed at its top). Measured on the 1/10 full-shape set: the parent held
    ~1.5 GB of such pages going into pass 2, which every forked worker then counted too.
    """
    trim = libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


#: ``mallopt`` parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

#: what a worker sets (bytes): where glibc's dynamic thresholds end up in a process that frees large
#: blocks (mmap threshold at its 32 MiB ceiling, trim threshold twice that), no pad
WORKER_MALLOPT = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20, M_TOP_PAD: 0}


def apply_worker_malloc_settings() -> bool:
    """Put glibc's mmap threshold, trim threshold and top pad back to glibc's own (steady-state)
    behaviour, :data:`WORKER_MALLOPT`, and return the free heap to the OS; False without glibc ``mallopt``.

    For forked loader workers: a training rank raises these limits (``train/allocator.py``: blocks
    up to 1 GiB from the heap, 1 GiB of free heap kept, 256 MiB top pad) so that its step reuses the
    same pages, and a forked worker inherits them. A worker only builds batches (~100 MB each at the
    evaluation's 16,384 rows of the full Ali-CCP shape), hands them to its rank and frees them; under
    the inherited settings its heaps keep the fragments (1.8 GB anonymous per evaluation worker on the
    1/10 full-shape set, 2 ranks).

    glibc's *dynamic* mmap threshold (starting at 128 KiB, climbing with the sizes freed up to 32 MiB,
    the trim threshold following at twice that) cannot be switched back on: any ``mallopt`` of these
    parameters, the rank's included, turns it off for good. So the values are fixed at where it ends up
    for a process freeing blocks this large. Measured on that evaluation (``docs/train.md``): per-worker
    peak 1.77-1.87 -> 1.23-1.31 GB, evaluation rows/s not separable from noise, the loader alone ~27 % fewer
    batches per second (page faults on fresh mappings; still far above what the evaluation consumes).
    glibc's starting 128 KiB for both kept 0.15 GB less per worker but cost ~11 % of the evaluation's
    rows/s on 2 cores; lowering only the trim threshold (32 MiB, mmap threshold left at 1 GiB) kept
    as much as before or more (one run): the memory is heap fragments, not a free heap top.
    """
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return False
    ok = all(mallopt(param, value) == 1 for param, value in WORKER_MALLOPT.items())
    release_free_memory()
    return ok


#: C signatures (argument types, result type) of the glibc functions used here
_LIBC_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "malloc_trim": ([ctypes.c_size_t], ctypes.c_int),
    "mallopt": ([ctypes.c_int, ctypes.c_int], ctypes.c_int),
}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, opened once: ``ctypes.util.find_library``, the fall-back for a libc not named
    ``libc.so.6``, runs ``ldconfig`` in a child process, which a big process should not fork at
    every call."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@functools.cache
def libc_function(symbol: str) -> Any:
    """glibc's ``symbol`` (``malloc_trim``, ``mallopt``) with its C signature; None without it
    (musl and other C libraries have neither)."""
    fn = getattr(_libc(), symbol, None)
    if fn is not None:
        fn.argtypes, fn.restype = _LIBC_SIGNATURES[symbol]
    return fn
