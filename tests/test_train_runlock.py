"""One writer per run folder (issue 10, section 2): a second training of a folder that a live process
writes is refused at once, naming the holder; a dead holder's lock never blocks; torchelastic restarts
of the job that holds it go on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ctnocvr_rec.cli import main
from ctnocvr_rec.train import checkpoint as ckpt
from ctnocvr_rec.train.commands import EXIT_RUN_FOLDER_BUSY
from ctnocvr_rec.train.runlock import LOCK_FILE, RunFolderBusyError, acquire_run_lock, read_lock_record
from ctnocvr_rec.train.testing import write_tiny_prepared

REPO = Path(__file__).resolve().parents[1]

HOLD_LOCK = """
import sys, time
from ctnocvr_rec.train.runlock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{out.get('PYTHONPATH', '')}", **extra})
    out.pop("CTNOCVR_RUN_LOCK_TOKEN", None)
    return out


def test_a_live_holder_refuses_a_second_writer_and_its_kill_9_frees_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusyError) as refused:
            acquire_run_lock(tmp_path)
        message = str(refused.value)
        assert str(tmp_path) in message and f"host {socket.gethostname()}, pid {holder.pid}," in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with acquire_run_lock(tmp_path) as lock:  # the kernel dropped the dead holder's lock
        assert lock.stale is not None and lock.stale["pid"] == holder.pid
        assert any(f"pid {holder.pid}" in note and "stale" in note for note in lock.notes)
        assert read_lock_record(tmp_path)["pid"] == os.getpid()
    assert acquire_run_lock(tmp_path).fd is not None  # released: free again


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                  "started": "2026-01-01T00:00:00+0000", "token": "x"}))
    lock = acquire_run_lock(tmp_path)
    try:
        assert lock.stale["pid"] == dead.pid and read_lock_record(tmp_path)["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_releases(tmp_path):
    lock = acquire_run_lock(tmp_path)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # like a DataLoader worker: outlives the parent's release for a moment
        os.close(read_end)
        os.write(write_end, b"x")
        time.sleep(3)
        os._exit(0)
    os.close(write_end)
    os.read(read_end, 1)
    lock.release()
    try:
        acquire_run_lock(tmp_path).release()  # would raise if the child had kept the lock
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_tiny_prepared(tmp_path_factory.mktemp("prepared"), {"train": 2000, "valid": 200, "test": 300})


def write_config(path: Path, prepared: Path, run_dir: Path, seed: int, ckpt_every: int = 4) -> Path:
    cfg = {
        "data": {"prepared_dir": str(prepared), "batch_size": 200, "eval_batch_size": 256},
        "model": {"arch": "mmoe", "embedding_dim": 6, "num_experts": 2, "expert_hidden": [16], "tower_hidden": [16]},
        "train": {"epochs": 1, "checkpoint_every_steps": ckpt_every, "log_every_steps": 2, "eval_every_steps": 0,
                  "run_dir": str(run_dir), "device": "cpu", "progress_bar": False, "seed": seed},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ctnocvr_rec.cli", *args]


@pytest.mark.slow
def test_two_trainings_of_one_run_folder_the_second_is_refused_at_once(prepared, tmp_path, capfd):
    """The first training runs in its own process; the second ones (`ctnocvr train`, in one process and
    with `--nproc 2`) and the final eval run through the CLI's main() in this one."""
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    first = subprocess.Popen(cli("train", "-c", str(write_config(tmp_path / "a.yaml", prepared, run_dir, seed=1))),
                             cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while read_lock_record(run_dir).get("pid") != first.pid:
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        first.send_signal(signal.SIGSTOP)  # keep it mid-run, lock held, while the others try
        second_cfg = write_config(tmp_path / "b.yaml", prepared, run_dir, seed=2)
        for extra in ([], ["--nproc", "2"]):
            started = time.time()
            code = main(["train", "-c", str(second_cfg), *extra])
            err = capfd.readouterr().err
            assert code == EXIT_RUN_FOLDER_BUSY, err[-3000:]
            assert time.time() - started < 10  # refused at start, not after training
            errors = [line for line in err.splitlines() if "error:" in line]
            assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
            assert f"{run_dir} is already being written by another training: host {socket.gethostname()}, " \
                   f"pid {first.pid}," in errors[0]
            assert "launching" not in err  # --nproc: refused before torchrun starts
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-3000:]

    # the folder is the first run's alone: its config, one run in the log, checkpoints that load
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"] == 1
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in log if e["kind"] == "train"]
    assert steps == sorted(set(steps)) and [e["kind"] for e in log].count("final") == 1
    assert not list(run_dir.glob("checkpoints.old-*"))
    assert [c.step for c in ckpt.list_checkpoints(run_dir)] == [8, 10]
    assert main(["eval", "--run-dir", str(run_dir), "--json", "-o", "train.device=cpu"]) == 0
    assert json.loads(capfd.readouterr().out)["steps"] == 10


@pytest.mark.slow
def test_torchelastic_restart_of_the_job_holding_the_lock_goes_on(prepared, tmp_path):
    """Plain torchrun (as under TorchX): rank 0 holds the lock; when a rank is SIGKILLed, torchelastic
    stops the whole attempt and the restarted rank 0 takes the lock again and resumes."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "a.yaml", prepared, run_dir, seed=1, ckpt_every=2)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
         "-m", "ctnocvr_rec.cli", "train", "-c", str(config)],
        cwd=REPO, env=env(CTNOCVR_FAULT_AT_STEP="3"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr or "SIGKILL" in proc.stderr  # the first attempt did die
    assert f"resumed from {run_dir / 'checkpoints' / 'step-2'} (step 2)" in proc.stderr
    record = read_lock_record(run_dir)
    assert record["role"] == "train" and record["job"]["restart"] == 1 and record["job"]["run_id"]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 5  # 2000 rows / (2 x 200)
