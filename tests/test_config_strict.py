"""Strict configs: numeric ranges checked at load, YAML errors as one ``error:`` line with file:line
(exit 2) for every YAML the tool reads, and ``-o`` errors naming the ``-o``."""

from __future__ import annotations

import dataclasses
import glob
import typing
from pathlib import Path

import pytest

from ctnocvr_rec import config as config_mod
from ctnocvr_rec.cli import main
from ctnocvr_rec.config import ConfigError, RunConfig, load_config
from ctnocvr_rec.data.schema import load_schema
from ctnocvr_rec.experiments.spec import load_experiment

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# ranges
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,rule", [
    ("train.epochs=-1", ">= 1"),
    ("train.optim.dense_lr=-0.001", "> 0"),
    ("train.optim.sparse_lr=0", "> 0"),
    ("model.dropout=1.5", "in [0, 1)"),
    ("data.batch_size=0", ">= 1"),
    ("model.tower_hidden=[64, 0]", "each value >= 1"),
    ("model.field_embedding_dims.101=-4", "each value >= 1"),
    ("train.optim.min_lr_ratio=2", "in [0, 1]"),
    ("train.optim.dense_lr=.inf", "> 0"),
])
def test_out_of_range_override_names_the_override_and_the_rule(override, rule):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"-o {override}: ")
    assert str(e.value).endswith(f"out of range; valid values: {rule}")


def test_out_of_range_value_in_a_file_names_file_key_and_rule(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: -1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.epochs: -1 is out of range; valid values: >= 1$"):
        load_config(path)
    path.write_text("model:\n  dropout: 1.5\n")
    with pytest.raises(ConfigError, match=r"model\.dropout: 1\.5 is out of range; valid values: in \[0, 1\)$"):
        load_config(path)


def test_boundaries_are_accepted():
    cfg = load_config(None, ["train.epochs=1", "model.dropout=0", "train.steps=0", "train.optim.min_lr_ratio=1",
                             "model.num_task_experts=0", "train.keep_checkpoints=0"])
    assert cfg.train.epochs == 1 and cfg.model.dropout == 0.0


def _numeric(tp) -> bool:
    args = typing.get_args(tp)
    return tp in (int, float) or (typing.get_origin(tp) in (list, dict) and args[-1] in (int, float))


def test_every_numeric_field_declares_a_range_and_the_defaults_satisfy_it():
    missing = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif _numeric(tp) and tp is not bool and "range" not in f.metadata:
                missing.append(prefix + f.name)

    walk(RunConfig, "")
    assert not missing, f"numeric config fields without a declared range: {missing}"
    config_mod.from_dict(RunConfig, config_mod.to_dict(RunConfig()))  # defaults pass their own rules


def test_every_shipped_config_still_loads():
    runs = [p for p in glob.glob(str(REPO / "ctnocvr_rec" / "configs" / "*.yaml"))]
    assert len(runs) >= 9
    for path in runs:
        load_config(path)
    for path in glob.glob(str(REPO / "ctnocvr_rec" / "configs" / "experiments" / "*.yaml")):
        load_experiment(path)
    for path in glob.glob(str(REPO / "ctnocvr_rec" / "configs" / "fields" / "*.yaml")):
        load_schema(path)


# ---------------------------------------------------------------------------------------------
# YAML errors and -o errors through the CLI: one error line, exit 2
# ---------------------------------------------------------------------------------------------

BAD_YAML = {
    "unsafe_tag": ("train:\n  seed: !!python/object/apply:os.system ['echo hi']\n", ":2:9: tag !!python/object/apply:os.system is not allowed"),
    "syntax": ("train:\n  epochs: 2\n   steps: [1, 2\n", ":3:"),
    "duplicate_key": ("train:\n  epochs: 2\n  steps: 5\n  epochs: 3\n", ":4:3: duplicate key 'epochs' (first at line 2)"),
    "duplicate_section": ("train: {epochs: 2}\nmodel: {}\ntrain: {steps: 1}\n", ":3:1: duplicate key 'train' (first at line 1)"),
}


def _one_error_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert " error: " in err[0]
    return err[0]


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_run_config_yaml_is_one_error_line_with_file_and_line(case, tmp_path, capsys):
    text, expected = BAD_YAML[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = _one_error_line(capsys, ["train", "-c", str(path)])
    assert f"{path}{expected}" in line, line


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_experiment_preset_yaml_is_one_error_line(case, tmp_path, capsys):
    text, expected = BAD_YAML[case]
    path = tmp_path / "exp.yaml"
    path.write_text(text.replace("train", "run"))
    line = _one_error_line(capsys, ["experiment", "table3", "--config", str(path), "--report-only"])
    assert f"{path}{expected.replace('train', 'run')}" in line, line


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_field_schema_yaml_names_file_and_line(case, tmp_path):
    text, expected = BAD_YAML[case]
    path = tmp_path / "fields.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_schema(path)
    assert f"{path}{expected}" in str(e.value) and "\n" not in str(e.value)


def test_duplicate_field_schema_key_is_not_silently_dropped(tmp_path):
    path = tmp_path / "fields.yaml"
    path.write_text("fields:\n  - {name: '101', group: user, group: item}\n")
    with pytest.raises(ValueError, match=r"fields\.yaml:2:.*duplicate key 'group'"):
        load_schema(path)


def test_non_utf8_and_bom_files(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"train:\n  run_dir: caf\xe9\n")
    assert _one_error_line(capsys, ["train", "-c", str(path)]).endswith(f"{path}:2: not UTF-8 text (byte 0xe9)")
    path.write_bytes(b"\xef\xbb\xbftrain:\n  epochs: 3\n")  # a BOM is not part of the YAML
    assert load_config(path).train.epochs == 3


def test_override_type_error_names_the_override_not_the_file(tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  epochs: 1\n")
    line = _one_error_line(capsys, ["train", "-c", str(path), "-o", "train.epochs=abc"])
    assert line.endswith("error: -o train.epochs=abc: expected an integer, got 'abc'"), line
    assert str(path) not in line
    line = _one_error_line(capsys, ["train", "-c", str(path), "-o", "model.tower_hidden=[1,"])
    assert "error: -o model.tower_hidden=[1,: " in line and str(path) not in line
    line = _one_error_line(capsys, ["train", "-c", str(path), "-o", "train.seed=!!python/name:os.system"])
    assert "error: -o train.seed=!!python/name:os.system: tag !!python/name:os.system is not allowed" in line
