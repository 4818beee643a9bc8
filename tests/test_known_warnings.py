"""The benign fbgemm autograd warning is filtered in the training entry points, and only it."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from ctnocvr_rec.train.known_warnings import FBGEMM_DENSE_LOOKUP_NO_AUTOGRAD, quiet_benign_fbgemm_warning
from ctnocvr_rec.train.testing import write_tiny_prepared

REPO = Path(__file__).resolve().parents[1]
NEEDLE = "an autograd kernel was not registered"

#: after a real `ctnocvr train` (through cli.main, as every --nproc / TorchX rank runs it): the very
#: same C++ warning for another operator, and an unrelated UserWarning, must still be printed
SCRIPT = """
import sys, warnings, torch
from ctnocvr_rec.cli import main
rc = main(["train", "-c", sys.argv[1]])
lib = torch.library.Library("ctnocvr_test", "DEF")
lib.define("twice(Tensor x) -> Tensor")
lib.impl("twice", lambda x: x * 2, "CPU")
x = torch.ones(2, requires_grad=True)
torch.ops.ctnocvr_test.twice(x).sum().backward()
warnings.warn("a different warning, still shown")
sys.exit(rc)
"""


@pytest.mark.slow
def test_training_stderr_has_no_fbgemm_autograd_warning_but_other_warnings_show(tmp_path):
    prepared = write_tiny_prepared(tmp_path / "prepared", {"train": 400, "valid": 100, "test": 100})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"prepared_dir": str(prepared), "batch_size": 100, "eval_batch_size": 128},
        "model": {"arch": "esmm", "embedding_dim": 4, "tower_hidden": [8]},
        # the planner makes the tiny tables data-parallel: the fbgemm dense lookup is used
        "train": {"device": "cpu", "progress_bar": False, "run_dir": str(tmp_path / "run"), "steps": 2},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data_parallel" in proc.stderr  # the plan printed by the run: the dense lookup ran
    assert "dense_embedding_codegen_lookup_function" not in proc.stderr
    assert f"ctnocvr_test::twice: {NEEDLE}" in proc.stderr
    assert "a different warning, still shown" in proc.stderr


def test_the_filter_matches_only_that_operator():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_benign_fbgemm_warning()
        warnings.warn(f"{FBGEMM_DENSE_LOOKUP_NO_AUTOGRAD} to the Autograd key(s) ...", UserWarning, stacklevel=1)
        warnings.warn(f"fbgemm::other_op: {NEEDLE} to the Autograd key(s) ...", UserWarning, stacklevel=1)
        warnings.warn(f"{FBGEMM_DENSE_LOOKUP_NO_AUTOGRAD} ...", RuntimeWarning, stacklevel=1)
    assert [str(w.message)[:16] for w in seen] == ["fbgemm::other_op", "fbgemm::dense_em"]
    assert seen[1].category is RuntimeWarning
