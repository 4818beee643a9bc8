"""One writer per run folder: an OS-level lock on ``<run_dir>/.lock`` (``fcntl.flock``).

Two trainings writing one folder interleave ``log.jsonl``, overwrite each other's ``config.yaml`` and
delete each other's checkpoint temp folders. The first writer therefore takes an exclusive, non-blocking
``flock`` on ``<run_dir>/.lock`` *before it writes anything* into the folder and holds it for the
whole run; a second writer is refused at once with :class:`RunFolderBusyError`, whose message names the
folder and the holder (host, pid, start time, TorchElastic run id) read from the file's JSON record.

Which process holds it:

- ``ctnocvr train`` in one process: that process.
- ``ctnocvr train --nproc N`` and ``train_and_evaluate(cfg, nproc=N)``: the launching process, before
  it writes ``config.yaml``, for the whole ``torch.distributed.run`` job *including its restarts*. It
  hands its lock descriptor to torchrun (``pass_fds``: the agent keeps the lock if the launcher is
  killed) and a token to the workers (:data:`TOKEN_ENV`); their rank 0 checks that the lock is held
  under that token and goes on without taking it.
- plain ``torchrun`` / a TorchX job: rank 0 of every attempt, first thing in the run. Every rank learns
  the outcome by a broadcast, so a refused job stops on all ranks together. TorchElastic restarts a
  job only after it has stopped every worker of the failed attempt, so the lock is free again; a
  restarted attempt of the same job (same ``TORCHELASTIC_RUN_ID``) still waits up to
  ``wait_same_job_s`` for a dying holder to let go.
- The other ranks never take it: they write only checkpoint shards, into the temp folder that rank 0
  creates while holding the lock, between barriers with rank 0.

``flock`` is released by the kernel when the holder's last descriptor closes: on any exit, ``kill -9``
included. The descriptor is close-on-exec and is closed in forked children (DataLoader workers), so
no helper process keeps a dead run's lock. The file itself stays; a record whose holder is gone is
*stale* and never blocks: the next writer takes the lock and reports whose it was.

Filesystems: local ones and NFSv4 (Linux maps ``flock`` to NFS byte-range locks, so hosts exclude
each other) work; Lustre needs the ``flock`` mount option. Where locking is not supported the run goes
on with a warning that the one-writer guard is off. Never delete ``.lock`` by hand while a run lives.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
#: environment variable through which a launcher tells its workers the token of the lock it holds
TOKEN_ENV = "CTNOCVR_RUN_LOCK_TOKEN"

#: descriptors of the locks this process holds: closed in forked children (see _close_in_child)
_HELD_FDS: set[int] = set()


def _close_in_child() -> None:
    # A forked child shares the lock's open file description; closing its copy (never LOCK_UN, which
    # would release the parent's lock) means a lingering child cannot keep a dead run's folder locked.
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunFolderBusyError(RuntimeError):
    """Another live process holds the run folder's writer lock."""


@dataclass
class RunLock:
    """The writer lock of one run folder, as held (or borrowed) by this process.

    ``fd`` is the locked descriptor (None when borrowed from a launcher, unsupported, or released);
    ``record`` the JSON written into the lock file; ``stale`` the record of a previous holder that had
    ended when this one took the lock (None if the file was new or the previous holder was this one).
    """

    run_dir: Path
    fd: int | None
    record: dict[str, Any]
    borrowed: bool = False
    stale: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def token(self) -> str:
        return str(self.record.get("token", ""))

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """Descriptors to hand to a launched torchrun so that it keeps the lock too."""
        return (self.fd,) if self.fd is not None else ()

    def child_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` plus the token that lets the launched workers' rank 0 borrow this lock."""
        return {**env, TOKEN_ENV: self.token} if self.token else dict(env)

    def release(self) -> None:
        """Give the lock up (idempotent). Exiting the process does the same."""
        if self.fd is not None:
            _HELD_FDS.discard(self.fd)
            os.close(self.fd)  # the last descriptor of the file description: the kernel drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _job_identity() -> dict[str, Any]:
    job: dict[str, Any] = {}
    if "TORCHELASTIC_RUN_ID" in os.environ:
        job["run_id"] = os.environ["TORCHELASTIC_RUN_ID"]
        job["restart"] = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return job


def _new_record(role: str) -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "role": role,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        "started_unix": round(now, 3),
        "job": _job_identity(),
        "token": uuid.uuid4().hex,
        "argv": " ".join(sys.argv)[:500],
    }


def _read_record(fd: int) -> dict[str, Any]:
    """The JSON record of the lock file ({} if empty or half-written: the holder writes it right after locking)."""
    for _ in range(5):
        try:
            raw = os.pread(fd, 1 << 16, 0)
            return json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            time.sleep(0.05)
    return {}


def read_lock_record(run_dir: str | Path) -> dict[str, Any]:
    """The last holder's record in ``<run_dir>/.lock`` ({} if none). Says nothing about whether it is live."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return _read_record(fd)
    finally:
        os.close(fd)


def describe_holder(record: dict[str, Any]) -> str:
    """``host H, pid P, started T (torchelastic run R, attempt A)`` or ``an unknown process``."""
    if not record:
        return "an unknown process (its lock file has no record yet)"
    text = f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started {record.get('started', '?')}"
    job = record.get("job") or {}
    if job.get("run_id"):
        text += f" (torchelastic run {job['run_id']}, attempt {job.get('restart', 0)})"
    return text


def _earlier_attempt_of_this_job(record: dict[str, Any]) -> bool:
    mine, theirs = _job_identity(), record.get("job") or {}
    return bool(mine.get("run_id")) and theirs.get("run_id") == mine["run_id"] and \
        int(theirs.get("restart", 0)) < int(mine.get("restart", 0))


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record, indent=1) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def acquire_run_lock(run_dir: str | Path, role: str = "train", inherited_token: str | None = None,
                     wait_same_job_s: float = 60.0) -> RunLock:
    """Take the writer lock of ``run_dir`` (created if missing) or raise :class:`RunFolderBusyError`.

    ``inherited_token``: the token a launcher passed in :data:`TOKEN_ENV`; when the lock is held under
    it, the returned lock is *borrowed* (nothing is held or released here).
    ``wait_same_job_s``: how long a restarted TorchElastic attempt waits for the previous attempt of
    the same job to let go; any other holder is refused at once.

    Example::

        with acquire_run_lock("runs/x") as lock:  # refused at once if another process writes runs/x
            ...  # write the folder
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    deadline = time.monotonic() + wait_same_job_s
    notes: list[str] = []
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            if inherited_token and holder.get("token") == inherited_token:
                return RunLock(run_dir, None, holder, borrowed=True)
            if _earlier_attempt_of_this_job(holder) and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise RunFolderBusyError(
                f"{run_dir} is already being written by another training: {describe_holder(holder)} "
                f"(lock file {path}). A run folder has one writer: wait for that run to end, stop it, "
                "or choose another --run-dir"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                note = (f"warning: the filesystem of {run_dir} does not support file locks ({e.strerror}); "
                        "the one-writer guard of the run folder is off")
                return RunLock(run_dir, None, {}, notes=[note])
            raise
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # .lock was deleted or replaced between open and flock: lock the new one
            os.close(fd)
            continue
        previous = _read_record(fd)
        record = _new_record(role)
        _write_record(fd, record)
        _HELD_FDS.add(fd)
        stale = previous if previous and previous.get("pid") != os.getpid() else None
        if stale:
            notes.append(f"took over the lock of {run_dir} last held by {describe_holder(stale)}: "
                         "that process has ended (stale lock file)")
        if inherited_token:
            notes.append(f"warning: the launcher's lock of {run_dir} was gone (launcher ended?); "
                         "this job holds it now")
        return RunLock(run_dir, fd, record, stale=stale, notes=notes)
