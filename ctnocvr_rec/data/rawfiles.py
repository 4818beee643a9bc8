"""Raw input files and output folders on disk: byte-range chunks, the UTF-8 byte order mark, and the
temporary folders of ``ctnocvr data prepare`` (naming and clean-up after a killed run).

Kept apart from :mod:`ctnocvr_rec.data.prepare` (the pipeline) because these rules are about files,
not rows; see ``docs/design.md`` ("Reader rules").
"""

from __future__ import annotations

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
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None without glibc), looked up once: ``ctypes.util.find_library``
    runs ``ldconfig`` in a child process, which a big process should not fork at every call."""
    import ctypes
    import ctypes.util

    for name in ("libc.so.6", "find"):
        if name == "find":  # not the usual glibc soname: ask the system (runs ldconfig)
            name = ctypes.util.find_library("c")
            if not name:
                break
        try:
            trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
        except OSError:
            continue
        if trim is not None:
            trim.argtypes = [ctypes.c_size_t]
            trim.restype = ctypes.c_int
            return trim
    return None
