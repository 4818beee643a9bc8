"""A rank's Python stacks reach its log: on ``kill -USR1`` and when native code kills it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

SETUP = "from ctnocvr_rec.train.api import enable_rank_stacks; enable_rank_stacks()\n"


def _run(body: str) -> subprocess.CompletedProcess[str]:
    # -X faulthandler off / PYTHONFAULTHANDLER unset: the child starts without it, as a rank does
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    return subprocess.run([sys.executable, "-c", SETUP + body], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_fatal_signal_from_native_code_prints_the_stack_first():
    # os.abort() raises SIGABRT in C, as std::terminate does in a collective library's thread
    proc = _run("def where_it_died():\n    import os; os.abort()\nwhere_it_died()\n")
    assert proc.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in proc.stderr and "where_it_died" in proc.stderr, proc.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_usr1_prints_every_thread_and_the_rank_goes_on():
    proc = _run("import os, signal\ndef stuck_here():\n    os.kill(os.getpid(), signal.SIGUSR1)\n"
                "stuck_here()\nprint('still running')\n")
    assert proc.returncode == 0 and proc.stdout.strip() == "still running"
    assert "stuck_here" in proc.stderr, proc.stderr
