"""``ctnocvr predict --format NAME``: new files of the format a model was trained on, scored without
preparing them, equal (1e-5) to scoring the same rows prepared with the model's vocabularies
(``predict --prepared``); reader and writer rejects counted with file:row; a schema mismatch refused.

Each case: ``data prepare`` (train files + the files to score as a split) -> train 4 steps -> export
-> ``predict --prepared`` of the split(s) holding the scored rows vs ``predict --format`` of the
same files; ``sample_id``: prepared = (rows of the files before) + format's running row index.
Formats: ``aliccp-rechub-csv`` (dense features), ``aliccp-aitm-csv`` (AITM's files, sparse only),
``table``. Programs: fp32 for each; the int8 program (AITM) and the AOTInductor package (rechub: a
dense program, tail batch of 1 row) through the same ``--format`` path.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_data_format_table_e2e import BAD_LINES
from test_data_format_table_e2e import prepare as prepare_table
from test_data_format_table_e2e import write_inputs as write_table_inputs
from test_data_formats_csv import AITM_HEADER, RECHUB_HEADER, make_rows, write_csv

from ctnocvr_rec.cli import main as cli_main
from ctnocvr_rec.serving import Scorer
from ctnocvr_rec.serving.export import export_run
from ctnocvr_rec.serving.formatinput import iter_format_batches, open_for_scoring
from ctnocvr_rec.serving.predict import predict
from ctnocvr_rec.serving.rawinput import RawReport

PROBS = ("p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr")
pytestmark = pytest.mark.slow


INT8_TOLERANCE = 2e-3  # docs/serving.md, "int8 tolerance"


def train_and_export(root: Path, int8: bool = False) -> Path:
    torch.set_num_threads(1)
    argv = ["train", "-c", "mmoe", "-o", f"data.prepared_dir={root / 'prepared'}", f"train.run_dir={root / 'run'}",
            "train.steps=4", "train.device=cpu", "train.progress_bar=false", "train.checkpoint_every_steps=0",
            "train.eval_every_steps=0", "data.batch_size=64", "data.eval_batch_size=256"]
    assert cli_main(argv) == 0
    export_run(root / "run", root / "model", int8=int8, log=lambda _: None)
    return root / "model"


def predictions(path: Path) -> dict[int, tuple]:
    """sample_id -> (labels, probabilities) of a predict output."""
    t = pq.read_table(path).to_pydict()
    return {sid: (t["click"][i], t["conversion"][i], *(t[p][i] for p in PROBS))
            for i, sid in enumerate(t["sample_id"])}


def assert_same_scores(by_format: dict[int, tuple], by_prepared: dict[int, tuple], offset: int) -> None:
    assert sorted(s + offset for s in by_format) == sorted(by_prepared)
    got = np.array([by_format[s] for s in sorted(by_format)], np.float64)
    want = np.array([by_prepared[s + offset] for s in sorted(by_format)], np.float64)
    np.testing.assert_array_equal(got[:, :2], want[:, :2])  # labels
    np.testing.assert_allclose(got[:, 2:], want[:, 2:], rtol=0, atol=1e-5)


def read_rejects(path: Path) -> list[tuple[str, int, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["file"], int(r["row"]), r["reason"]) for r in csv.DictReader(f)]


def predict_files(scorer: Scorer, out: Path, fmt: str, **options) -> dict:
    """``predict --format fmt`` in process with a loaded scorer (the CLI path loads the program each time)."""
    args = argparse.Namespace(**{"schema": None, "train": None, "valid": None, "test": None, **options})
    source, desc = open_for_scoring(fmt, args, None)
    return predict(scorer.contract.folder, out, batch_size=100, progress=False, scorer=scorer, source=source,
                   source_desc=desc)


def run_json(argv: list[str], capfd) -> dict:
    import json

    capfd.readouterr()
    assert cli_main([*argv, "--no-progress", "--json"]) == 0, argv
    return json.loads(capfd.readouterr().out)


@pytest.fixture(scope="module")
def rechub(tmp_path_factory) -> dict[str, Path]:
    """A rechub-CSV model (dense features; fp32 program) and ``fresh.csv`` (the prepared set's test split:
    300 rows, 4 of them with an item id never seen in training, plus 4 bad rows), scored by ``--prepared``."""
    root = tmp_path_factory.mktemp("rechub")
    fresh_rows = make_rows(300, 12, RECHUB_HEADER)
    for row in fresh_rows[:4]:
        row["205"] = "99999"  # never seen in training: the OOV row, counted
    cells = ",".join(fresh_rows[5][h] for h in RECHUB_HEADER).split(",")
    bad = {3: ",".join(["0", "1"] + cells[2:]),  # conversion without click (writer rule)
           7: ",".join(cells[:2] + ["x"] + cells[3:]),  # non-numeric id (reader)
           9: ",".join(cells[:-1] + [""]),  # missing dense value (writer rule)
           11: ",".join(cells[:-1] + ["inf"])}  # infinite dense value
    write_csv(root / "train.csv", RECHUB_HEADER, make_rows(900, 11, RECHUB_HEADER))
    fresh = write_csv(root / "fresh.csv", RECHUB_HEADER, fresh_rows, raw_lines=bad)
    assert cli_main(["data", "prepare", "--format", "aliccp-rechub-csv", "--train", str(root / "train.csv"),
                     "--test", str(fresh), "--out", str(root / "prepared"), "--no-progress",
                     "--rows-per-shard", "400"]) == 0
    model = train_and_export(root)
    predict(model, root / "p.parquet", prepared=root / "prepared", progress=False, scorer=Scorer.load(model))
    return {"root": root, "fresh": fresh, "model": model, "prepared_scores": root / "p.parquet"}


def test_rechub_csv_files_score_like_their_prepared_rows(rechub, tmp_path, capfd):
    fresh, model = rechub["fresh"], rechub["model"]
    base = ["predict", "--model", str(model), "--batch-size", "64"]
    s = run_json([*base, "--format", "aliccp-rechub-csv", "--test", str(fresh), "--out", str(tmp_path / "f.parquet")],
                 capfd)
    assert (s["rows_in"], s["rows"], s["rows_rejected"]) == (304, 300, 4)
    assert s["rejects_by_reason"] == {"invalid_label_pair": 1, "non_numeric": 1, "dense_not_finite": 2}
    assert s["unseen_by_field"].get("205", 0) >= 4
    assert read_rejects(Path(s["rejects_file"])) == [(str(fresh), 3, "invalid_label_pair"), (str(fresh), 7, "non_numeric"),
                                                     (str(fresh), 9, "dense_not_finite"), (str(fresh), 11, "dense_not_finite")]
    by_format = predictions(tmp_path / "f.parquet")
    assert 2 not in by_format and 3 in by_format  # data row 3 rejected: sample_id 2 has no prediction
    assert_same_scores(by_format, predictions(rechub["prepared_scores"]), offset=900)

    # another format's files (no dense features, other fields) are refused before any scoring
    aitm = write_csv(tmp_path / "aitm.csv", AITM_HEADER, make_rows(20, 3, AITM_HEADER))
    rc = cli_main([*base, "--format", "aliccp-aitm-csv", "--test", str(aitm), "--out", str(tmp_path / "x.parquet"),
                   "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 2 and "is not the model's" in err and "dense features: the input lacks ['D109_14'" in err, err
    assert not (tmp_path / "x.parquet").exists()
    # the files option must say which split to score when several are given
    rc = cli_main([*base, "--format", "aliccp-rechub-csv", "--train", str(rechub["root"] / "train.csv"), "--test", str(fresh),
                   "--out", str(tmp_path / "x.parquet"), "--no-progress"])
    assert rc == 2 and "say which to score with --split" in capfd.readouterr().err


def test_aot_package_of_a_dense_model_scores_format_files(rechub, tmp_path, capfd):
    """``--precision aot``: the AOTInductor package (dense sixth input) of the same run, batches of 299 and 1
    rows. Slow: compiling the package is most of it (19-32 s in three runs, 2 cores at load 4-5)."""
    fresh = rechub["fresh"]
    export_run(rechub["root"] / "run", tmp_path / "model", aot=True, int8=False, log=lambda _: None)
    args = argparse.Namespace(schema=None, train=None, valid=None, test=[str(fresh)])
    report = RawReport()
    sizes = [b.batch_size for b in iter_format_batches(open_for_scoring("aliccp-rechub-csv", args, None)[0], 299,
                                                       report)]
    assert sizes == [299, 1]  # the package's dynamic batch dim down to 1
    s = run_json(["predict", "--model", str(tmp_path / "model"), "--precision", "aot", "--batch-size", "299",
                  "--format", "aliccp-rechub-csv", "--test", str(fresh), "--out", str(tmp_path / "a.parquet")], capfd)
    assert s["precision"] == "aot" and (s["rows"], s["rows_rejected"]) == (300, 4)
    assert_same_scores(predictions(tmp_path / "a.parquet"), predictions(rechub["prepared_scores"]), offset=900)


@pytest.fixture(scope="module")
def aitm(tmp_path_factory) -> dict[str, Path]:
    """AITM's files ``ctr_cvr.train`` (900 rows) and ``ctr_cvr.test`` (the prepared set's test split: 301
    rows, 3 with an item id never seen in training, plus 4 bad rows); a model with fp32 and int8 programs,
    the test split scored by ``--prepared`` with each."""
    root = tmp_path_factory.mktemp("aitm")
    rows = make_rows(301, 22, AITM_HEADER)
    for row in rows[:3]:
        row["205"] = "99999"  # never seen in training: the OOV row, counted
    cells = [rows[5][h] for h in AITM_HEADER]
    bad = {2: ",".join(["2"] + cells[1:]),  # click not 0/1 (reader)
           4: ",".join(cells[:-1]),  # 19 of the 20 columns (reader)
           6: ",".join(["0", "1"] + cells[2:]),  # purchase without click (writer rule)
           8: ",".join(cells[:11] + ["1.5"] + cells[12:])}  # not an integer id, field 205 (reader)
    write_csv(root / "ctr_cvr.train", AITM_HEADER, make_rows(900, 21, AITM_HEADER))
    test = write_csv(root / "ctr_cvr.test", AITM_HEADER, rows, raw_lines=bad)
    assert cli_main(["data", "prepare", "--format", "aliccp-aitm-csv", "--train", str(root / "ctr_cvr.train"),
                     "--test", str(test), "--out", str(root / "prepared"), "--no-progress"]) == 0
    model = train_and_export(root, int8=True)
    for precision in ("fp32", "int8"):
        predict(model, root / f"p-{precision}.parquet", prepared=root / "prepared", progress=False,
                scorer=Scorer.load(model, precision=precision))
    return {"root": root, "test": test, "model": model}


def test_aitm_csv_files_score_like_their_prepared_rows(aitm, tmp_path, capfd):
    test = aitm["test"]
    s = run_json(["predict", "--model", str(aitm["model"]), "--batch-size", "64", "--format", "aliccp-aitm-csv",
                  "--test", str(test), "--out", str(tmp_path / "f.parquet")], capfd)
    assert (s["rows_in"], s["rows"], s["rows_rejected"]) == (305, 301, 4)
    assert s["rejects_by_reason"] == {"bad_label": 1, "wrong_column_count": 1, "invalid_label_pair": 1,
                                      "non_numeric": 1}
    assert s["unseen_by_field"] == {"205": 3}
    assert read_rejects(Path(s["rejects_file"])) == [(str(test), 2, "bad_label"), (str(test), 4, "wrong_column_count"),
                                                     (str(test), 6, "invalid_label_pair"), (str(test), 8, "non_numeric")]
    by_format = predictions(tmp_path / "f.parquet")
    assert 1 not in by_format and 2 in by_format  # data row 2 rejected: sample_id 1 has no prediction
    assert_same_scores(by_format, predictions(aitm["root"] / "p-fp32.parquet"), offset=900)


def test_int8_program_scores_format_files_like_its_prepared_rows(aitm, tmp_path, capfd):
    base = ["predict", "--model", str(aitm["model"]), "--batch-size", "64", "--format", "aliccp-aitm-csv",
            "--test", str(aitm["test"])]
    s = run_json([*base, "--precision", "int8", "--out", str(tmp_path / "i.parquet")], capfd)
    assert s["precision"] == "int8" and (s["rows"], s["rows_rejected"]) == (301, 4)
    by_format = predictions(tmp_path / "i.parquet")
    assert_same_scores(by_format, predictions(aitm["root"] / "p-int8.parquet"), offset=900)
    # the int8 program, not the float one: within the int8 tolerance of fp32 but not equal (the same program
    # scores both paths identically here; the int8 tables move these probabilities by up to ~7e-6)
    fp32 = predictions(aitm["root"] / "p-fp32.parquet")
    diff = max(abs(a - b) for k, v in by_format.items() for a, b in zip(v[2:], fp32[k + 900][2:], strict=True))
    assert 1e-6 < diff <= INT8_TOLERANCE, diff
    # an export without the AOT package: refused naming the option that builds it, no output
    rc = cli_main([*base, "--precision", "aot", "--out", str(tmp_path / "x.parquet"), "--no-progress"])
    assert rc == 2 and "no aot program" in capfd.readouterr().err and not (tmp_path / "x.parquet").exists()


def test_table_files_score_like_their_prepared_rows(tmp_path, capfd):
    inputs = write_table_inputs(tmp_path / "in")
    assert prepare_table(tmp_path / "in", tmp_path / "prepared") == 0
    model = train_and_export(tmp_path)
    schema = tmp_path / "in" / "schema-user.yaml"
    base = ["predict", "--model", str(model), "--batch-size", "100"]
    # train-a.csv (the bad lines), train-b.csv: the first input files, so their rows have the same
    # sample_id in both paths (the running index continues across files); the prepared set put them into
    # train and the carved valid split
    scorer = Scorer.load(model)
    prepared: dict[int, tuple] = {}
    for split in ("train", "valid", "test"):
        predict(model, tmp_path / f"p-{split}.parquet", prepared=tmp_path / "prepared", split=split, progress=False,
                scorer=scorer)
        prepared.update(predictions(tmp_path / f"p-{split}.parquet"))
    train_a = tmp_path / "in" / "train-a.csv"
    s = run_json([*base, "--format", "table", "--table-schema", str(schema), "--train", str(train_a),
                  str(tmp_path / "in" / "train-b.csv"), "--out", str(tmp_path / "a.parquet")], capfd)
    assert (s["rows_in"], s["rows"], s["rows_rejected"]) == (900 + len(BAD_LINES), 900, len(BAD_LINES))
    assert read_rejects(Path(s["rejects_file"])) == inputs["rejects"]
    by_format = predictions(tmp_path / "a.parquet")
    assert_same_scores(by_format, {k: v for k, v in prepared.items() if k < 900 + len(BAD_LINES)}, offset=0)

    # the Parquet test file (log1p + standardize on price through the exported transform)
    s = predict_files(scorer, tmp_path / "t.parquet", "table", table_schema=str(schema),
                      test=[str(tmp_path / "in" / "test.parquet")])
    assert (s["rows"], s["rows_rejected"]) == (300, 0) and "rejects_file" not in s
    assert_same_scores(predictions(tmp_path / "t.parquet"),
                       {k: v for k, v in prepared.items() if k >= 900 + len(BAD_LINES)}, offset=900 + len(BAD_LINES))

    # a table schema with another dense transform than the model's is refused, naming the feature
    other = tmp_path / "other.yaml"
    other.write_text(schema.read_text().replace("{name: price, transform: log1p, standardize: true}", "{name: price}"))
    rc = cli_main([*base, "--format", "table", "--table-schema", str(other), "--test", str(tmp_path / "in" / "test.parquet"),
                   "--out", str(tmp_path / "x.parquet"), "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 2 and "dense feature price: transform=none, standardize=False in the input schema" in err, err
