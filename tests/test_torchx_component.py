"""The TorchX component (launchers/ctnocvr.py): every ``torchx run`` command of README.md and
docs/train.md parses as written, and a real 2-rank ``torchx run`` passes several ``-o`` overrides."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctnocvr_rec.cli import build_parser
from ctnocvr_rec.train.testing import write_tiny_prepared

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", REPO / "docs" / "train.md"]


def documented_torchx_commands() -> list[tuple[str, str]]:
    """(file, command) of every ``torchx run`` line in a bash block, ``\\`` continuations joined."""
    found = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text(encoding="utf-8"))
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("torchx run"):
                    found.append((doc.name, line))
    return found


COMMANDS = documented_torchx_commands()


def test_the_docs_have_torchx_commands():
    assert len(COMMANDS) >= 7, COMMANDS
    assert {"local_cwd", "slurm", "kubernetes"} <= {shlex.split(c)[3] for _, c in COMMANDS if "-s" in c}


def _ctnocvr_argv(app) -> list[str]:
    """The ``ctnocvr`` arguments inside the ``bash -c "torchrun ... -m ctnocvr_rec.cli ..."`` role."""
    (role,) = app.roles
    torchrun = shlex.split(role.args[-1])
    return torchrun[torchrun.index("ctnocvr_rec.cli") + 1:]


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_torchx_command_parses_as_written(doc, command, monkeypatch):
    """torchx's own CLI checks (repeated options, component arguments), then ``ctnocvr``'s parser on
    the command the job would run. (A dry run needs each scheduler's client; see the next test.)"""
    from torchx.cli.cmd_run import _parse_component_name_and_args
    from torchx.runner.config import get_configs
    from torchx.specs.builders import materialize_appdef
    from torchx.specs.finder import get_component

    monkeypatch.chdir(REPO)  # .torchxconfig defaults and the launcher path are repo-relative
    # `torchx run`'s own options (its parser keeps state across instances, so a plain copy here)
    parser = argparse.ArgumentParser()
    parser.add_argument("-s", "--scheduler")
    parser.add_argument("-cfg", "--scheduler_args")
    parser.add_argument("--workspace")
    parser.add_argument("component_name_and_args", nargs=argparse.REMAINDER)
    argv = shlex.split(command.replace("$PWD", str(REPO)))
    assert argv[:2] == ["torchx", "run"]
    ns = parser.parse_args(argv[2:])
    component, component_args = _parse_component_name_and_args(ns.component_name_and_args, parser)
    defaults = get_configs(prefix="component", name=component, dirs=[str(REPO)])
    app = materialize_appdef(get_component(component).fn, component_args, defaults)
    build_parser().parse_args(_ctnocvr_argv(app))  # exits (SystemExit) on arguments `ctnocvr` rejects
    if "--" in component_args:
        after = component_args[component_args.index("--") + 1:]
        assert _ctnocvr_argv(app)[-len(after):] == after  # passed through untouched


@pytest.mark.parametrize("scheduler", ["local_cwd", "slurm"])
def test_documented_torchx_commands_dry_run(scheduler):
    """``torchx run --dryrun`` of the documented commands whose scheduler needs no client library
    (Kubernetes needs the ``kubernetes`` package and Docker, not installed here)."""
    commands = [c for _, c in COMMANDS if shlex.split(c)[3] == scheduler]
    assert commands
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in commands:
        proc = subprocess.run(command.replace("torchx run", "torchx run --dryrun", 1), shell=True, cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        assert "-m ctnocvr_rec.cli " in proc.stdout


@pytest.mark.slow
def test_several_overrides_reach_every_rank_of_a_real_torchx_job(tmp_path):
    """Two overrides after one ``-o`` (torchx refuses ``-o a -o b``): both are in the saved config and
    in the trained run (seed and steps)."""
    prepared = write_tiny_prepared(tmp_path / "prepared", {"train": 800, "valid": 100, "test": 200})
    run_dir = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"prepared_dir": str(prepared), "batch_size": 100, "eval_batch_size": 128},
        "model": {"arch": "esmm", "embedding_dim": 4, "tower_hidden": [8]},
        "train": {"device": "cpu", "progress_bar": False, "run_dir": str(run_dir)},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'torchx'}",
           "launchers/ctnocvr.py:train", "--config", str(config), "--j", "1x2",
           "--", "-o", "train.seed=7", "train.steps=3", "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["seed"] == 7 and saved["train"]["steps"] == 3
    metrics = yaml.safe_load((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["seed"] == 7 and metrics["world_size"] == 2
