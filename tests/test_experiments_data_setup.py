"""Typed data set-up steps of an experiment: checked at load, run by the library, former layout still loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ctnocvr_rec.config import ConfigError
from ctnocvr_rec.experiments.data_setup import (
    prepare_options,
    run_data_setup,
    steps_from_command_lines,
    synth_step,
)
from ctnocvr_rec.experiments.spec import load_experiment

FORMER_SYNTH_PRESET = [
    ["data", "synth", "--out", "artifacts/synth_preset/raw", "--rows-train", "600000", "--rows-test", "150000",
     "--seed", "7"],
    ["data", "prepare", "--raw-dir", "artifacts/synth_preset/raw", "--out", "artifacts/synth_preset/prepared"],
]


def _write(tmp_path: Path, data_setup, prepared: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "ds", "out_dir": str(tmp_path / "exp"), "data_setup": data_setup,
                                    "run": {"data": {"prepared_dir": str(prepared)}}}))
    return path


@pytest.mark.parametrize("name", ["synth_preset", "synth_compare"])
def test_migrated_presets_run_the_same_steps_as_their_former_command_lines(name):
    former = steps_from_command_lines(FORMER_SYNTH_PRESET, "former")
    exp = load_experiment(name)
    assert synth_step(exp.data_setup.synth, "now") == synth_step(former["synth"], "former")
    assert prepare_options(exp.data_setup.prepare, "now") == prepare_options(former["prepare"], "former")
    step = synth_step(exp.data_setup.synth, "now")
    assert (step.out, step.config.rows_train, step.config.seed, step.config.cvr) == (
        "artifacts/synth_preset/raw", 600_000, 7, 0.3)


def test_bad_steps_are_named_at_load(tmp_path):
    prepared = tmp_path / "prepared"
    cases = [
        ({"synth": {"out": "raw", "rows": 10}}, r"unknown key\(s\) \['rows'\] at .*data_setup.synth"),
        ({"synth": {"rows_train": 10}}, "data_setup.synth: 'out'"),
        ({"synth": {"out": "raw", "cvr": "high"}}, r"data_setup.synth.cvr: expected a number"),
        ({"prepare": {"raw_dir": "raw"}}, r"data_setup.prepare: \['out_dir'\] required"),
        ({"unpack": {}}, r"unknown key\(s\) \['unpack'\] at data_setup"),
        ([["data", "stats", "--prepared", "x"]], r"data_setup\[0\]: expected a mapping"),
        ([["data", "synth", "--rows-train", "10"]], r"data_setup\[0\]: .*--out"),
        ([["data", "synth", "--out", "a"], ["data", "synth", "--out", "b"]], r"data_setup\[1\]: a second 'data synth'"),
    ]
    for setup, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_experiment(_write(tmp_path, setup, prepared))


@pytest.mark.parametrize("layout", ["typed", "former"])
def test_set_up_makes_the_prepared_set_once(tmp_path, layout, monkeypatch):
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    if layout == "typed":
        setup = {"synth": {"out": str(raw), "rows_train": 600, "rows_test": 200, "users": 40, "items": 30, "seed": 3},
                 "prepare": {"raw_dir": str(raw), "out_dir": str(prepared), "workers": 1, "progress": False}}
    else:
        setup = [["data", "synth", "--out", str(raw), "--rows-train", "600", "--rows-test", "200", "--users", "40",
                  "--items", "30", "--seed", "3"],
                 ["data", "prepare", "--raw-dir", str(raw), "--out", str(prepared), "--workers", "1", "--no-progress"]]
    exp = load_experiment(_write(tmp_path, setup, prepared))
    import ctnocvr_rec.cli

    monkeypatch.setattr(ctnocvr_rec.cli, "main", lambda *a, **k: pytest.fail("the CLI was called"))
    lines: list[str] = []
    run_data_setup(exp, log=lines.append)
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["valid"]["rows"] == 600
    assert json.loads((raw / "synth_config.json").read_text())["seed"] == 3
    assert len(lines) == 2
    run_data_setup(exp, log=lines.append)  # the prepared set exists: nothing runs
    assert len(lines) == 2


def test_a_set_up_that_misses_the_run_prepared_dir_says_so(tmp_path):
    raw = tmp_path / "raw"
    setup = {"synth": {"out": str(raw), "rows_train": 300, "rows_test": 100, "users": 20, "items": 20},
             "prepare": {"raw_dir": str(raw), "out_dir": str(tmp_path / "elsewhere"), "workers": 1, "progress": False}}
    exp = load_experiment(_write(tmp_path, setup, tmp_path / "prepared"))
    with pytest.raises(FileNotFoundError, match="does data_setup.prepare.out_dir match run.data.prepared_dir"):
        run_data_setup(exp, log=lambda _: None)
