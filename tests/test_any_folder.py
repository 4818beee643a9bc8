"""The tool works from any working directory: configs, field schemas, experiment and plan presets are
package data (``ctnocvr_rec/configs``, ``ctnocvr_rec/resources.py``), found by name or by path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctnocvr_rec import resources
from ctnocvr_rec.cli import main as cli_main
from ctnocvr_rec.config import ConfigError, load_config
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.data.schema import load_schema
from ctnocvr_rec.experiments.spec import load_experiment

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Resolution rule (unit)
# ---------------------------------------------------------------------------------------------


def test_packaged_names_resolve_from_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("mmoe").model.arch == "mmoe"
    assert load_config("aliccp_paper_ple.yaml").model.arch == "ple"
    assert load_schema("aliccp").names[:2] == ["101", "121"]
    assert load_experiment("synth_preset").name == "synth_preset"
    assert {"mmoe", "mmoe_ctnocvr", "esmm"} <= set(resources.packaged_names("run"))
    assert resources.packaged_names("preset") == ["aliccp-full"]
    # the repository's old layout keeps working from anywhere (saved run configs, old command lines)
    assert resources.resolve("fields", "configs/fields/aliccp.yaml") == resources.resolve("fields", "aliccp")
    assert load_config("configs/mmoe.yaml").model.arch == "mmoe"


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mmoe").write_text("model: {arch: ple}\n", encoding="utf-8")
    assert load_config("mmoe").model.arch == "ple"  # ./mmoe exists: it is the file meant
    assert load_config("mmoe.yaml").model.arch == "mmoe"  # no ./mmoe.yaml: the packaged one


def test_unknown_name_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"mmeo: no such file .* packaged: .*mmoe_ctnocvr"):
        load_config("mmeo")
    with pytest.raises(FileNotFoundError, match=r"aliccpp: no such file .* packaged: aliccp"):
        load_schema("aliccpp")
    with pytest.raises(ConfigError, match=r"no packaged experiment .* packaged: .*synth_preset"):
        load_experiment("nope")
    assert cli_main(["plan", "--preset", "aliccp-ful"]) == 2


def test_references_inside_a_yaml_are_relative_to_its_folder(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "fields").mkdir(parents=True)
    schema_yaml = resources.resolve("fields", "aliccp").read_text(encoding="utf-8")
    (conf / "fields" / "mine.yaml").write_text(schema_yaml, encoding="utf-8")
    (conf / "run.yaml").write_text("data: {schema: fields/mine.yaml}\nmodel: {arch: cgc}\n", encoding="utf-8")
    (conf / "exp.yaml").write_text(
        "name: e\nbase_config: run.yaml\nrun: {train: {steps: 3}}\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../conf/run.yaml")
    assert Path(cfg.data.schema) == (conf / "fields" / "mine.yaml").resolve()
    assert load_schema(cfg.data.schema).names == load_schema("aliccp").names
    exp = load_experiment(conf / "exp.yaml")
    assert exp.run["model"]["arch"] == "cgc" and exp.run["train"]["steps"] == 3
    assert Path(exp.run["data"]["schema"]) == (conf / "fields" / "mine.yaml").resolve()
    # a name that is not a file next to the YAML stays a packaged name
    (conf / "run2.yaml").write_text("data: {schema: aliccp}\n", encoding="utf-8")
    assert load_config(conf / "run2.yaml").data.schema == "aliccp"


def test_package_data_lists_every_config_file():
    """pyproject's package-data globs match every file under ctnocvr_rec/configs (a wheel ships them)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    line = next(li for li in text.splitlines() if li.startswith("ctnocvr_rec = ["))
    globs = json.loads(line.split("=", 1)[1].strip())
    root = REPO / "ctnocvr_rec"
    matched = {p for g in globs for p in root.glob(g)}
    shipped = {p for p in (root / "configs").rglob("*") if p.is_file()}
    assert shipped and shipped == matched


# ---------------------------------------------------------------------------------------------
# Every command from a temporary folder (end to end)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_command_runs_from_a_temporary_folder(tmp_path, monkeypatch, capfd):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "configs").exists()
    run = [
        ["data", "synth", "--out", "raw", "--rows-train", "1500", "--rows-test", "400", "--seed", "1"],
        ["data", "prepare", "--raw-dir", "raw", "--out", "prepared", "--workers", "1", "--no-progress",
         "--rows-per-shard", "1000"],
        ["data", "stats", "--prepared", "prepared", "--split", "train", "test"],
        ["plan", "--preset", "aliccp-full"],
        ["train", "-c", "mmoe", "-o", "data.prepared_dir=prepared", "train.run_dir=run", "train.steps=3",
         "train.device=cpu", "train.progress_bar=false", "train.checkpoint_every_steps=0",
         "data.batch_size=64", "data.eval_batch_size=256", "eval.gauc=false"],
        ["eval", "--run-dir", "run", "--split", "test", "--json"],
    ]
    for argv in run:
        assert cli_main(argv) == 0, argv
    out = capfd.readouterr().out
    assert "Table 2" in out and "Imbalance across ranks" in out
    prepared = PreparedSet.open("prepared")
    assert prepared.schema.names == load_schema("aliccp").names and prepared.rows("test") == 400
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    evaluated = json.loads(out[out.rindex("\n{") + 1:])
    assert evaluated["metrics"]["auc_ctr"] == trained["metrics"]["auc_ctr"]  # same checkpoint, same split


@pytest.mark.slow
def test_fresh_interpreter_outside_the_repository(tmp_path):
    """No import path or file of the repository's working tree is needed besides the package."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "ctnocvr_rec.cli", "plan", "--preset", "aliccp-full", "-c", "mmoe_ctnocvr",
         "--world-size", "2", "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "preset aliccp-full" in done.stdout + done.stderr
