"""Damaged checkpoints are never used silently (issue 10, section 3).

One short in-process run writes step-4 and step-8; each test damages a copy the way a disk, a
network filesystem or a person can (flipped bytes, a deleted or truncated file, a deleted meta.json,
a corrupted rank file) and checks that ``ctnocvr eval``, ``ctnocvr train --resume`` and
``ctnocvr checkpoint verify`` find it, fall back to the newest intact checkpoint and say so, or stop
with one error line when none is intact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from ctnocvr_rec.cli import main
from ctnocvr_rec.config import load_config
from ctnocvr_rec.train import checkpoint as ckpt
from ctnocvr_rec.train.api import run_in_process
from ctnocvr_rec.train.setup import build_unsharded_model
from ctnocvr_rec.train.testing import write_tiny_prepared

CONSTRAINTS = "plan.constraints={t_205: {sharding_types: [table_wise]}, t_101: {sharding_types: [column_wise]}}"


def make_cfg(prepared: Path, run_dir: Path, *extra: str):
    return load_config(None, [
        f"data.prepared_dir={prepared}", f"train.run_dir={run_dir}", "data.batch_size=200",
        "data.eval_batch_size=256", "train.epochs=1", "train.steps=8", "train.checkpoint_every_steps=4",
        "train.keep_checkpoints=3", "train.log_every_steps=4", "train.progress_bar=false",
        "model.embedding_dim=6", "model.num_experts=2", "model.expert_hidden=[16]", "model.tower_hidden=[16]",
        "train.optim.dense_lr=0.01", "train.eval_every_steps=0", "train.device=cpu", CONSTRAINTS, *extra,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A finished run with checkpoints step-4 and step-8, and its metrics."""
    torch.set_num_threads(1)
    prepared = write_tiny_prepared(tmp_path_factory.mktemp("prepared"), {"train": 1800, "valid": 200, "test": 300})
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = run_in_process(make_cfg(prepared, run_dir))
    assert [c.step for c in ckpt.list_checkpoints(run_dir)] == [4, 8]
    return run_dir, result


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run folder to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def flip_bytes(path: Path) -> None:
    """Flip the top (sign) bit of a few bytes in the middle of the file, as a bad disk would."""
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, min(len(data), len(data) // 2 + 64), 8):
        data[offset] ^= 0x80
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_rank_file(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10:40] = b"\x00" * 30
    path.write_bytes(bytes(data))


#: (what is done to the newest checkpoint, the file the report must name)
DAMAGE = {
    "flipped_bytes_in_distcp": (lambda d: flip_bytes(d / "__0_0.distcp"), "__0_0.distcp"),
    "deleted_distcp": (lambda d: (d / "__0_0.distcp").unlink(), "__0_0.distcp: missing"),
    "truncated_metadata": (lambda d: truncate(d / ".metadata"), ".metadata: size"),
    "deleted_meta_json": (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
    "corrupted_rank_file": (lambda d: corrupt_rank_file(d / "rank-0.pt"), "rank-0.pt"),
    "edited_meta_json": (lambda d: edit_meta(d, epoch=7), "meta.json: its checksum does not match"),
}


def edit_meta(folder: Path, **values) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(values)
    (folder / "meta.json").write_text(json.dumps(meta))


def cli(capfd, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capfd.readouterr()
    return code, out.out, out.err


def eval_args(run_dir: Path, *extra: str) -> list[str]:
    return ["eval", "--run-dir", str(run_dir), "--json", "-o", "train.device=cpu", *extra]


def test_every_checkpoint_records_size_and_sha256_of_each_file(trained, capfd):
    run_dir, _ = trained
    for step in (4, 8):
        folder = step_dir(run_dir, step)
        meta = json.loads((folder / "meta.json").read_text())
        on_disk = sorted(p.name for p in folder.iterdir() if p.name != "meta.json")
        assert sorted(meta["files"]) == on_disk and ".metadata" in on_disk and "rank-0.pt" in on_disk
        for name, entry in meta["files"].items():
            data = (folder / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    code, out, _ = cli(capfd, "checkpoint", "verify", str(run_dir))
    assert code == 0, out
    assert [line.split()[:2] for line in out.splitlines()[1:3]] == [["step-4", "intact"], ["step-8", "intact"]]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_eval_and_verify_skip_a_damaged_newest_checkpoint_loudly(run, damage, capfd):
    do, named = DAMAGE[damage]
    do(step_dir(run, 8))

    code, out, err = cli(capfd, *eval_args(run))
    assert code == 0, err
    result = json.loads(out)
    assert result["checkpoint"] == str(step_dir(run, 4)) and result["steps"] == 4
    assert f"skipping damaged checkpoint {step_dir(run, 8)}: " in err and named in err, err

    code, out, _ = cli(capfd, "checkpoint", "verify", str(run))
    assert code == 1, out
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["step-4", "intact"]
    assert lines[2].split()[:2] == ["step-8", "DAMAGED"] and named in lines[2], out


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_matches_the_straight_run(trained, run, capfd):
    _, straight = trained
    flip_bytes(step_dir(run, 8) / "__0_0.distcp")
    code, _, err = cli(capfd, "train", "-c", str(run / "config.yaml"), "--run-dir", str(run), "--resume")
    assert code == 0, err
    assert f"skipping damaged checkpoint {step_dir(run, 8)}: __0_0.distcp: sha256" in err
    assert f"resumed from {step_dir(run, 4)} (step 4)" in err
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "checkpoint" and "skipping damaged checkpoint" in e["message"] for e in logged)
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["steps"] == 8 and resumed["metrics"] == straight["metrics"]  # bit-identical
    assert ckpt.newest_intact_checkpoint(run).step == 8  # the damaged step-8 was written anew


@pytest.mark.parametrize("command", ["eval", "resume", "verify"])
def test_no_intact_checkpoint_stops_with_one_error_line_naming_the_damage(run, command, capfd):
    flip_bytes(step_dir(run, 8) / "__0_0.distcp")
    truncate(step_dir(run, 4) / ".metadata")
    argv = {
        "eval": eval_args(run),
        "resume": ["train", "-c", str(run / "config.yaml"), "--run-dir", str(run), "--resume"],
        "verify": ["checkpoint", "verify", str(run)],
    }[command]
    code, out, err = cli(capfd, *argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    if command == "verify":
        assert "no usable checkpoint" in out and "step-4  DAMAGED" in out
        return
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert "no intact checkpoint (2 damaged" in errors[0]
    assert "__0_0.distcp: sha256 " in errors[0] and ", expected " in errors[0]  # file, actual vs expected
    assert ".metadata: size " in errors[0]


def test_a_damaged_checkpoint_named_explicitly_is_refused_not_replaced(run, capfd):
    (step_dir(run, 8) / "__0_0.distcp").unlink()
    code, _, err = cli(capfd, *eval_args(run, "--checkpoint", str(step_dir(run, 8))))
    assert code == 2
    assert f"checkpoint {step_dir(run, 8)} is damaged: __0_0.distcp: missing" in err and "Traceback" not in err


def test_load_model_weights_verifies_first(trained, run):
    flip_bytes(step_dir(run, 8) / "__0_0.distcp")
    cfg = make_cfg(trained[1]["config"]["data"]["prepared_dir"], run)
    model = build_unsharded_model(cfg, torch.device("cpu"))
    with pytest.raises(ckpt.CheckpointDamagedError, match=r"__0_0\.distcp: sha256 .*, expected "):
        ckpt.load_model_weights(step_dir(run, 8), model)
    ckpt.load_model_weights(step_dir(run, 4), model)  # intact: loads


def strip_checksums(folder: Path) -> None:
    """Turn a checkpoint into one written before checksums were recorded."""
    meta = json.loads((folder / "meta.json").read_text())
    for key in ("files", "checksum", "hash", "hash_seconds"):
        meta.pop(key, None)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_checkpoints_without_checksums_still_load_with_a_warning(trained, run, capfd):
    for step in (4, 8):
        strip_checksums(step_dir(run, step))
    code, out, err = cli(capfd, *eval_args(run))
    assert code == 0, err
    result = json.loads(out)
    assert result["steps"] == 8  # the newest, loaded into the unsharded model: the trained run's metrics
    assert abs(result["metrics"]["auc_ctr"] - trained[1]["metrics"]["auc_ctr"]) < 1e-6
    warnings = [line for line in err.splitlines() if "has no checksums" in line]
    assert len(warnings) == 1 and str(step_dir(run, 8)) in warnings[0]
    code, out, _ = cli(capfd, "checkpoint", "verify", str(run))
    assert code == 0 and out.count("unverified") == 2, out

    # damage such a checkpoint cannot see beforehand still ends in one error line, not a traceback
    truncate(step_dir(run, 8) / ".metadata")
    code, _, err = cli(capfd, *eval_args(run, "--checkpoint", str(step_dir(run, 8))))
    assert code == 2 and "Traceback" not in err
    assert f"{step_dir(run, 8)}: cannot be loaded" in err
