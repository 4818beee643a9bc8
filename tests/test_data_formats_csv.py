"""`ctnocvr data prepare --format aliccp-rechub-csv | aliccp-aitm-csv`: the community Ali-CCP CSVs
through the format-neutral writer. Small files written here; every row read back from the shards."""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctnocvr_rec.cli import main as cli_main
from ctnocvr_rec.data.dense import ExactMoments
from ctnocvr_rec.data.formats import FORMATS
from ctnocvr_rec.data.formats.aliccp_aitm_csv import SPARSE_COLUMNS as AITM_SPARSE
from ctnocvr_rec.data.formats.aliccp_rechub_csv import DENSE_COLUMNS, SPARSE_COLUMNS
from ctnocvr_rec.data.formats.base import stable_id_hash
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.data.schema import load_schema
from ctnocvr_rec.data.vocab import FieldVocab

RECHUB_HEADER = ["click", "purchase", *SPARSE_COLUMNS, *DENSE_COLUMNS]
AITM_HEADER = ["click", "purchase", *AITM_SPARSE]


def make_rows(n: int, seed: int, header: list[str]) -> list[dict[str, str]]:
    """Rows like the real files: label-encoded small ids, float16-looking dense values, valid label pairs."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        click = int(rng.random() < 0.3)
        row = {"click": str(click), "purchase": str(int(click and rng.random() < 0.4))}
        for name in header[2:]:
            if name.startswith("D"):
                row[name] = repr(float(np.float16(rng.random()))) if rng.random() < 0.8 else "0.0"
            else:
                row[name] = str(int(rng.integers(0, 12)))
        rows.append(row)
    return rows


def write_csv(path: Path, header: list[str], rows: list[dict[str, str]], *, crlf: bool = False,
              bom: bool = False, final_newline: bool = True, index_column: str | None = None,
              raw_lines: dict[int, str] | None = None) -> Path:
    """``raw_lines``: data row number (1-based) -> a literal line inserted there (bad input)."""
    names = ([index_column] if index_column is not None else []) + header
    lines = [",".join(names)]
    for i, row in enumerate(rows):
        while raw_lines and len(lines) in raw_lines:
            lines.append(raw_lines[len(lines)])
        values = ([str(i)] if index_column is not None else []) + [row[h] for h in header]
        lines.append(",".join(values))
    end = "\r\n" if crlf else "\n"
    text = end.join(lines) + (end if final_newline else "")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def prepare(out: Path, fmt: str, *args: str) -> int:
    return cli_main(["data", "prepare", "--format", fmt, "--out", str(out), "--no-progress",
                     "--rows-per-shard", "150", *args])


def read_back(prepared: Path) -> dict[int, dict]:
    """sample_id -> row of the shards (split, labels, raw ids via the vocabulary, dense values)."""
    ps = PreparedSet.open(prepared)
    out = {}
    for split in ps.splits:
        for file in ps.files(split):
            table = pq.read_table(file).to_pylist()
            for row in table:
                row["split"] = split
                out[row["sample_id"]] = row
    return out


def _vocabs(prepared: Path) -> dict[str, FieldVocab]:
    ps = PreparedSet.open(prepared)
    return {spec.name: FieldVocab.load(spec, prepared / "vocab") for spec in ps.schema}


@pytest.mark.parametrize("fmt,header", [("aliccp-rechub-csv", RECHUB_HEADER), ("aliccp-aitm-csv", AITM_HEADER)])
def test_counts_labels_ids_and_dense_round_trip(tmp_path, fmt, header):
    train = make_rows(400, 1, header)
    test = make_rows(120, 2, header)
    for row in test[:5]:
        row["205"] = "999"  # never seen on train: out of vocabulary
    write_csv(tmp_path / "train.csv", header, train)
    write_csv(tmp_path / "test.csv", header, test)
    out = tmp_path / "prepared"
    assert prepare(out, fmt, "--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv"),
                   "--valid-fraction", "0.25") == 0
    ps = PreparedSet.open(out)
    m = ps.manifest
    assert m["rejects"]["rows_in"] == 520 == m["rejects"]["rows_written"] and m["rejects"]["rows_rejected"] == 0
    assert ps.rows("train") + ps.rows("valid") == 400 and ps.rows("test") == 120
    assert 60 < ps.rows("valid") < 140  # carved from train by --valid-fraction
    assert len(ps.files("train")) == -(-ps.rows("train") // 150)  # B = ceil(rows / rows_per_shard)
    got = read_back(out)
    vocabs = _vocabs(out)
    inputs = train + test
    assert sorted(got) == list(range(520))  # sample_id = running data-row index over train then test
    valid_ids = set()
    for sid, source in enumerate(inputs):
        row = got[sid]
        assert row["split"] == ("test" if sid >= 400 else row["split"])
        if row["split"] == "valid":
            valid_ids.add(sid)
        assert (row["click"], row["conversion"]) == (int(source["click"]), int(source["purchase"]))
        assert row["user_id"] == int(source["101"])  # field 101 is the user id
        assert row["request_id"] == -1
        for spec in ps.schema:
            assert row[spec.name] == [int(vocabs[spec.name].map(np.array([int(source[spec.name])]))[0])]
        for d in ps.schema.dense:  # aliccp_rechub: stored as read (float32), no transform
            assert row[d.column] == float(np.float32(float(source[d.name])))
    assert [d.name for d in ps.schema.dense] == ([*DENSE_COLUMNS] if fmt == "aliccp-rechub-csv" else [])
    # train-only vocabulary: ids of valid/test-only rows map to OOV 0; the planted 999 is OOV on test
    train_ids = {int(inputs[s]["205"]) for s in range(400) if s not in valid_ids}
    assert set(vocabs["205"].raw_ids.tolist()) == train_ids
    assert all(got[400 + i]["205"] == [0] for i in range(5))
    # every split's counts in the manifest are the shards'
    for split in ps.splits:
        rows = [r for r in got.values() if r["split"] == split]
        entry = m["splits"][split]
        assert entry["rows"] == len(rows) and entry["clicks"] == sum(r["click"] for r in rows)
        assert entry["conversions"] == sum(r["conversion"] for r in rows)


def test_real_file_quirks_are_read_and_bad_rows_rejected_with_file_and_row(tmp_path):
    rows = make_rows(60, 3, RECHUB_HEADER)
    rows[0]["205"] = "3.0"  # an integer written as a float (pandas after a NaN)
    rows[1]["click"], rows[1]["purchase"] = "1.0", "0.0"
    good = ",".join(rows[2][h] for h in RECHUB_HEADER)
    cells = good.split(",")
    bad = {
        3: ",".join(["0", "1"] + cells[2:]),  # conversion without click
        5: ",".join(cells[:2] + ["x"] + cells[3:]),  # non-numeric id
        7: ",".join(cells[:2] + ["2.5"] + cells[3:]),  # a non-integer id
        9: ",".join(cells[:-1] + ["nan"]),  # NaN dense
        11: ",".join(cells[:-1] + [""]),  # missing dense
        13: ",".join(cells[:10]),  # short line
        15: ",".join(["2"] + cells[1:]),  # label not in {0, 1}
        17: ",".join(cells[:-1] + ["abc"]),  # dense that is not a number
    }
    # columns in another order, a pandas index column, BOM, CRLF, no final newline
    header = RECHUB_HEADER[::-1]
    reordered = {r: ",".join(dict(zip(RECHUB_HEADER, line.split(","))).get(h, "") for h in header)
                 if r != 13 else line for r, line in bad.items()}
    reordered = {r: "0," + line for r, line in reordered.items()}  # the index column's value
    path = write_csv(tmp_path / "train.csv", header, rows, crlf=True, bom=True, final_newline=False,
                     index_column="Unnamed: 0", raw_lines=reordered)
    out = tmp_path / "prepared"
    assert prepare(out, "aliccp-rechub-csv", "--train", str(path)) == 0
    m = PreparedSet.open(out).manifest
    assert (m["rejects"]["rows_in"], m["rejects"]["rows_written"], m["rejects"]["rows_rejected"]) == (68, 60, 8)
    assert m["input"]["files"][str(path)]["ignored_columns"] == ["Unnamed: 0"]
    with open(out / "rejects" / "rejects.csv", newline="", encoding="utf-8") as f:
        rejects = list(csv.DictReader(f))
    got = {(int(r["row"]), r["reason"]) for r in rejects}
    assert got == {(3, "invalid_label_pair"), (5, "non_numeric"), (7, "non_numeric"), (9, "dense_not_finite"),
                   (11, "dense_not_finite"), (13, "wrong_column_count"), (15, "bad_label"),
                   (17, "bad_dense_value")}
    assert all(r["file"] == str(path) for r in rejects)
    details = {int(r["row"]): r["detail"] for r in rejects}
    assert details[5] == "field 101: 'x'" and details[7] == "field 101: '2.5'"
    assert details[9] == "field D853: missing" and details[17] == "field D853: 'abc'"
    assert details[15] == "field click: '2'"
    back = read_back(out)
    assert sorted(back) == [i for i in range(68) if i + 1 not in bad]  # rejected rows keep their index
    vocab = _vocabs(out)["205"]
    first = back[0]  # data row 1 = the first good row
    assert first["205"] == [int(vocab.map(np.array([3]))[0])] and first["205"] != [0]
    assert (back[1]["click"], back[1]["conversion"]) == (1, 0)


def test_strict_names_file_row_and_field(tmp_path, capsys):
    rows = make_rows(20, 4, AITM_HEADER)
    line = ",".join(rows[0][h] for h in AITM_HEADER).split(",")
    path = write_csv(tmp_path / "ctr_cvr.train", AITM_HEADER, rows,
                     raw_lines={4: ",".join(line[:9] + ["1e"] + line[10:])})
    assert prepare(tmp_path / "p", "aliccp-aitm-csv", "--train", str(path), "--strict") == 2
    err = capsys.readouterr().err
    assert f"{path}:4: non_numeric (field 128: '1e'; line 5)" in err
    assert not (tmp_path / "p").exists()
    assert prepare(tmp_path / "p", "aliccp-aitm-csv", "--train", str(path)) == 0  # without: kept aside


def test_empty_split_is_an_error_unless_allowed(tmp_path, capsys):
    rows = make_rows(10, 5, AITM_HEADER)
    for row in rows:
        row["click"], row["purchase"] = "0", "1"
    train = write_csv(tmp_path / "train.csv", AITM_HEADER, rows)
    test = write_csv(tmp_path / "test.csv", AITM_HEADER, [])
    argv = ["--train", str(train), "--test", str(test)]
    assert prepare(tmp_path / "p", "aliccp-aitm-csv", *argv) == 2
    err = capsys.readouterr().err
    assert f"split train is empty: all 10 rows of {train} rejected (top reasons: invalid_label_pair 10)" in err
    assert f"split test is empty: {test} has no rows" in err and "first: row 1: invalid_label_pair" in err
    assert prepare(tmp_path / "p", "aliccp-aitm-csv", *argv, "--allow-empty-split") == 0
    assert PreparedSet.open(tmp_path / "p").manifest["rejects"]["rows_rejected"] == 10


def test_header_problems_are_clear_errors(tmp_path, capsys):
    rows = make_rows(5, 6, RECHUB_HEADER)
    missing = write_csv(tmp_path / "m.csv", [h for h in RECHUB_HEADER if h != "D702"],
                        [{k: v for k, v in r.items() if k != "D702"} for r in rows])
    assert prepare(tmp_path / "p", "aliccp-rechub-csv", "--train", str(missing)) == 2
    assert f"{missing}:1: header lacks column(s) ['D702'] required by --format aliccp-rechub-csv" in capsys.readouterr().err
    headless = tmp_path / "h.csv"
    headless.write_text("\n".join(",".join(r[h] for h in RECHUB_HEADER) for r in rows) + "\n")
    assert prepare(tmp_path / "p", "aliccp-rechub-csv", "--train", str(headless)) == 2
    assert f"{headless}:1: no header line" in capsys.readouterr().err
    assert prepare(tmp_path / "p", "aliccp-rechub-csv", "--train", str(tmp_path / "nope.csv")) == 2
    assert "nope.csv: no such file (--train)" in capsys.readouterr().err
    assert prepare(tmp_path / "p", "aliccp-rechub-csv", "--raw-dir", str(tmp_path)) == 2
    assert "--raw-dir: only for --format aliccp-raw" in capsys.readouterr().err


def test_output_does_not_depend_on_chunk_size_and_given_valid_is_kept(tmp_path):
    header = RECHUB_HEADER
    write_csv(tmp_path / "train.csv", header, make_rows(700, 7, header))
    write_csv(tmp_path / "val.csv", header, make_rows(90, 8, header))
    argv = ["--train", str(tmp_path / "train.csv"), "--valid", str(tmp_path / "val.csv")]
    digests = []
    for chunk_mb in ("0.004", "8"):
        out = tmp_path / f"p{chunk_mb}"
        assert prepare(out, "aliccp-rechub-csv", *argv, "--chunk-mb", chunk_mb) == 0
        digests.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert digests[0] == digests[1]
    ps = PreparedSet.open(tmp_path / "p8")
    assert (ps.rows("train"), ps.rows("valid")) == (700, 90)  # the given valid file, nothing carved
    assert ps.manifest["split_rule"]["valid_fraction"] is None
    # unchanged inputs and options: skipped; --force rebuilds the same bytes
    before = (tmp_path / "p8" / "manifest.json").stat().st_mtime_ns
    assert prepare(tmp_path / "p8", "aliccp-rechub-csv", *argv) == 0
    assert (tmp_path / "p8" / "manifest.json").stat().st_mtime_ns == before


def test_dense_transform_and_standardisation_fitted_on_train(tmp_path):
    schema = load_schema("aliccp_rechub").to_dict()
    schema["dense"][0] = {"name": "D109_14", "transform": "log1p", "standardize": True}
    schema["dense"][4] = {"name": "D508", "transform": "none", "standardize": True}
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(schema))
    rows = make_rows(300, 9, RECHUB_HEADER)
    for i, row in enumerate(rows):
        row["D109_14"] = repr(float(i) * 3.5 - 40.0)  # negative values too: sign(x) log1p(|x|)
    test = make_rows(50, 10, RECHUB_HEADER)
    write_csv(tmp_path / "train.csv", RECHUB_HEADER, rows)
    write_csv(tmp_path / "test.csv", RECHUB_HEADER, test)
    out = tmp_path / "p"
    assert prepare(out, "aliccp-rechub-csv", "--train", str(tmp_path / "train.csv"), "--test",
                   str(tmp_path / "test.csv"), "--schema", str(tmp_path / "s.yaml")) == 0
    ps = PreparedSet.open(out)
    stats = ps.manifest["dense_stats"]
    back = read_back(out)
    inputs = rows + test
    train_sids = [s for s, r in back.items() if r["split"] == "train"]

    def f(x: float) -> float:
        return float(np.sign(x) * np.log1p(abs(x)))

    for name, fn in (("D109_14", f), ("D508", float)):
        values = [fn(float(inputs[s][name])) for s in train_sids]
        mean = sum(map(Fraction, values)) / len(values)  # exact, independently of the writer
        var = sum(Fraction(v) ** 2 for v in values) / len(values) - mean ** 2
        assert stats[name]["mean"] == float(mean)
        assert stats[name]["std"] == pytest.approx(float(var) ** 0.5, rel=1e-15)
        assert stats[name]["transform"] == ("log1p" if name == "D109_14" else "none")
        for sid, row in back.items():  # test rows too, with the train statistics
            expect = (fn(float(inputs[sid][name])) - stats[name]["mean"]) / stats[name]["std"]
            assert row[f"{name}__d"] == float(np.float32(expect))
    assert stats["D110_14"] == {"mean": 0.0, "std": 1.0, "transform": "none", "standardize": False}


def test_exact_moments_do_not_depend_on_grouping():
    rng = np.random.default_rng(0)
    x = rng.normal(1e6, 3.0, 10_000) * rng.choice([1e-9, 1.0, 1e9], 10_000)
    whole, parts = ExactMoments(), ExactMoments()
    whole.add(x, "x")
    for piece in np.array_split(x[::-1], 7):
        parts.add(piece, "x")
    assert whole.mean_std() == parts.mean_std()
    assert whole.mean_std()[0] == float(sum(map(Fraction, x.tolist())) / len(x))


def test_stable_id_hash_is_fixed():
    # pinned: prepared sets depend on these values never changing
    assert stable_id_hash(["u1", "u2", "u1", ""]).tolist() == [
        6154817874995026322, 3376157322412989306, 6154817874995026322, int(stable_id_hash([b""])[0])]
    assert stable_id_hash(["é"]).tolist() == stable_id_hash(["é".encode()]).tolist()
    assert (stable_id_hash([str(i) for i in range(1000)]) >= 0).all()


def test_registry_lists_the_formats():
    assert {"aliccp-rechub-csv", "aliccp-aitm-csv"} <= set(FORMATS)
    for name, fmt in FORMATS.items():
        assert fmt.name == name and fmt.help


def test_pandas_default_index_column_is_ignored(tmp_path):
    """``df.to_csv(path)`` without ``index=False``: the header starts with an empty name."""
    rows = make_rows(30, 13, AITM_HEADER)
    path = write_csv(tmp_path / "ctr_cvr.train", AITM_HEADER, rows, index_column="")
    assert path.read_text().startswith(",click,purchase,101,")
    out = tmp_path / "p"
    assert prepare(out, "aliccp-aitm-csv", "--train", str(path), "--valid-fraction", "0") == 0
    m = PreparedSet.open(out).manifest
    assert m["input"]["files"][str(path)]["ignored_columns"] == [""]
    back = read_back(out)
    assert [(r["click"], r["conversion"]) for _, r in sorted(back.items())] == [
        (int(r["click"]), int(r["purchase"])) for r in rows]


def test_a_stray_quote_costs_one_row(tmp_path):
    rows = make_rows(12, 14, AITM_HEADER)
    cells = [rows[0][h] for h in AITM_HEADER]
    path = write_csv(tmp_path / "t.csv", AITM_HEADER, rows, raw_lines={
        2: ",".join(cells[:5] + ['"7'] + cells[6:]),  # an unbalanced quote: must not swallow row 3
        4: ",".join(cells[:5] + ['"7"'] + cells[6:]),
    })
    out = tmp_path / "p"
    assert prepare(out, "aliccp-aitm-csv", "--train", str(path)) == 0
    with open(out / "rejects" / "rejects.csv", newline="", encoding="utf-8") as f:
        got = [(int(r["row"]), r["reason"], r["detail"]) for r in csv.DictReader(f)]
    assert got == [(2, "non_numeric", "field 124: '\"7'"), (4, "non_numeric", "field 124: '\"7\"'")]
    assert PreparedSet.open(out).manifest["rejects"]["rows_written"] == 12


def test_split_by_user_seed_and_force(tmp_path):
    rows = make_rows(600, 15, AITM_HEADER)
    for i, row in enumerate(rows):
        row["101"] = str(i % 40)  # 40 users, 15 rows each
    path = write_csv(tmp_path / "t.csv", AITM_HEADER, rows)
    out = tmp_path / "p"
    assert prepare(out, "aliccp-aitm-csv", "--train", str(path), "--split-by", "user", "--valid-fraction", "0.3") == 0
    back = read_back(out)
    split_of_user: dict[int, set] = {}
    for row in back.values():
        split_of_user.setdefault(row["user_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of_user.values())  # a user's rows stay together
    valid_users = {u for u, s in split_of_user.items() if s == {"valid"}}
    assert 3 <= len(valid_users) <= 25
    assert PreparedSet.open(out).manifest["split_rule"]["by"] == "user"
    # another seed: another split and another shuffle; --force rebuilds an up-to-date set
    other = tmp_path / "q"
    assert prepare(other, "aliccp-aitm-csv", "--train", str(path), "--split-by", "user", "--valid-fraction", "0.3",
                   "--seed", "5") == 0
    assert {r["user_id"] for r in read_back(other).values() if r["split"] == "valid"} != valid_users
    before = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(out, "aliccp-aitm-csv", "--train", str(path), "--split-by", "user", "--valid-fraction", "0.3",
                   "--force") == 0
    assert (out / "manifest.json").stat().st_mtime_ns != before
    assert read_back(out) == back  # same inputs and options: the same rows in the same shards


def test_each_format_checks_its_own_options(tmp_path, capsys):
    train = write_csv(tmp_path / "t.csv", AITM_HEADER, make_rows(5, 16, AITM_HEADER))
    assert cli_main(["data", "prepare", "--out", str(tmp_path / "p"), "--train", str(train),
                     "--raw-dir", str(tmp_path)]) == 2  # the default format is aliccp-raw
    assert "--train: not options of --format aliccp-raw (it reads --raw-dir)" in capsys.readouterr().err
    assert cli_main(["data", "prepare", "--format", "aliccp-raw", "--out", str(tmp_path / "p")]) == 2
    assert "--format aliccp-raw needs --raw-dir FOLDER" in capsys.readouterr().err
    assert prepare(tmp_path / "p", "aliccp-aitm-csv") == 2
    assert "--format aliccp-aitm-csv needs --train FILE" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
