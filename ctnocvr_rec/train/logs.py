"""Run logging on rank 0: a tqdm bar (samples/s, running loss per task), ``log.jsonl`` and TensorBoard.

``log.jsonl`` is always written (one JSON object per line: ``{"kind": "train"|"eval"|..., "step", ...}``);
TensorBoard scalars go to ``<run_dir>/tb`` only when the ``tensorboard`` package is installed. Other
ranks get a logger that does nothing, so call sites need no ``if rank == 0``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes progress of one run (only does something when ``enabled``, i.e. on rank 0)."""

    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, initial_step: int = 0,
                 progress_bar: bool = True) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        try:  # optional dependency
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
        except Exception:  # noqa: BLE001 - tensorboard missing or broken: JSONL is enough
            self._tb = None
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps or None, initial=initial_step, unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0,
            )

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One JSONL line + TensorBoard scalars ``<kind>/<name>`` for the finite numbers."""
        if not self.enabled:
            return
        entry = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(entry, default=_jsonable) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def show(self, postfix: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        """A line on stderr that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._tb = self._jsonl = None


def _short(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
