"""``<run_dir>/diverged.json``: the record that a training job stopped on a non-finite loss.

A NaN/inf loss is a property of the model and its settings, not an infrastructure failure, so a
torchelastic restart (``--max-restarts``, TorchX ``--max_restarts``) cannot fix it: it would only
resume from the last good checkpoint and diverge again. torchelastic restarts on any failed worker
and has no "do not restart" exit code, so rank 0 records the divergence here before the ranks exit,
and the ranks of a restarted attempt of the *same* job (same ``TORCHELASTIC_RUN_ID``) find it and exit
with the same error at once, without building the model or training. The ``--nproc`` launcher reads
it to turn torchrun's generic exit 1 into the documented exit code 3.

The record of an earlier job in the same folder (another run id) is ignored, and removed when a
new job starts, so fixing the learning rate and running again (``--resume`` included) trains.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

MARKER = "diverged.json"


def _run_id() -> str | None:
    return os.environ.get("TORCHELASTIC_RUN_ID")


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def record(run_dir: str | Path, message: str, step: int) -> Path:
    """Write the record atomically (rank 0, before any rank of the job exits)."""
    path = Path(run_dir) / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"message": message, "step": step, "run_id": _run_id(), "attempt": restart_count(),
             "time": time.time()}
    tmp = path.with_name(f".{MARKER}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(entry, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MARKER
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and "message" in entry else None


def of_this_job(run_dir: str | Path) -> dict[str, Any] | None:
    """The record written by an earlier attempt of the running torchelastic job, if any."""
    entry = read(run_dir)
    if entry is None or _run_id() is None or restart_count() == 0:
        return None
    return entry if entry.get("run_id") == _run_id() else None


def since(run_dir: str | Path, started: float) -> dict[str, Any] | None:
    """The record if it was written after ``started`` (the launcher's view of its own job)."""
    entry = read(run_dir)
    return entry if entry is not None and float(entry.get("time", 0.0)) >= started else None


def clear(run_dir: str | Path) -> None:
    """Remove an earlier job's record (call on the first attempt of a new job, rank 0)."""
    (Path(run_dir) / MARKER).unlink(missing_ok=True)
