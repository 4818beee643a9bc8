"""The ``table`` input format's reader: table schema YAML, Parquet / CSV decoding, rejects with file:row,
open-time checks (missing columns, unusable Parquet types), bounded chunks."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from _table_example import write_doc_example
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ctnocvr_rec.data.formats import FORMATS
from ctnocvr_rec.data.formats import table as table_format
from ctnocvr_rec.data.formats.base import PrepareError, RawRows, stable_id_hash
from ctnocvr_rec.data.formats.table import TableFormat
from ctnocvr_rec.data.formats.table_schema import TableSchemaError, load_table_schema

SCHEMA = """\
labels: {click: clk, conversion: buy, conversion_requires_click: true}
user_id: {column: uid, id_type: string}
request_id: req
fields:
  - {name: user, column: uid, group: user, id_type: string}
  - {name: tags, group: item, multi_valued: true, weighted: true, weight_column: tag_w,
     mapping: hash, num_buckets: 64, allow_missing: true}
  - {name: cat, group: item, multi_valued: true, min_count: 2}
  - {name: shop, group: item}
dense:
  - {name: price, transform: log1p, standardize: true}
  - qty
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _open(tmp_path: Path, schema_text: str, train: list[Path], **splits: list[Path]) -> table_format.TableSource:
    schema = _write(tmp_path / "schema.yaml", schema_text)
    args = argparse.Namespace(table_schema=str(schema), train=[str(p) for p in train],
                              valid=[str(p) for p in splits.get("valid", [])] or None,
                              test=[str(p) for p in splits.get("test", [])] or None)
    return TableFormat().open(args)


def _read_all(source: table_format.TableSource, split: str = "train") -> list[RawRows]:
    return list(source.read(split))


def _rows(n: int, seed: int = 0) -> dict[str, list]:
    """``n`` random good rows as Python values (uid text, tags/cat lists, weights, floats)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("clk", "buy", "uid", "req", "tags", "tag_w", "cat", "shop", "price",
                                             "qty")}
    for _ in range(n):
        click = int(rng.integers(0, 2))
        rows["clk"].append(click)
        rows["buy"].append(int(click and rng.integers(0, 2)))
        rows["uid"].append(f"user-{rng.integers(0, 5)}")
        rows["req"].append(int(rng.integers(0, 1 << 40)))
        k = int(rng.integers(0, 4))
        rows["tags"].append([int(x) for x in rng.integers(-5, 1 << 35, size=k)])
        rows["tag_w"].append([float(x) for x in rng.integers(1, 8, size=k) / 4])
        rows["cat"].append([int(x) for x in rng.integers(0, 9, size=int(rng.integers(1, 3)))])
        rows["shop"].append(int(rng.integers(0, 1000)))
        rows["price"].append(float(rng.integers(0, 10_000)) / 8)
        rows["qty"].append(float(rng.integers(-3, 3)))
    return rows


def _parquet(path: Path, rows: dict[str, list]) -> Path:
    pq.write_table(pa.table({
        **{k: rows[k] for k in ("clk", "buy", "uid", "req", "shop", "price", "qty")},
        "tags": pa.array(rows["tags"], pa.list_(pa.int64())),
        "tag_w": pa.array(rows["tag_w"], pa.list_(pa.float32())),
        "cat": pa.array(rows["cat"], pa.list_(pa.int32())),
    }), path, row_group_size=7)
    return path


def _csv_cell(value, sep="|") -> str:
    return sep.join(str(v) for v in value) if isinstance(value, list) else str(value)


def _csv(path: Path, rows: dict[str, list], delimiter=",", sep="|") -> Path:
    cols = list(rows)
    lines = [delimiter.join(cols)]
    for i in range(len(rows["clk"])):
        lines.append(delimiter.join(_csv_cell(rows[c][i], sep) for c in cols))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _concat(chunks: list[RawRows]) -> dict:
    """The chunks of one file as plain arrays (offsets rebased), for equality checks."""
    out = {"rows": np.concatenate([c.rows for c in chunks]), "click": np.concatenate([c.click for c in chunks]),
           "conversion": np.concatenate([c.conversion for c in chunks]),
           "user_id": None if chunks[0].user_id is None else np.concatenate([c.user_id for c in chunks]),
           "request_id": None if chunks[0].request_id is None else np.concatenate([c.request_id for c in chunks])}
    for name in chunks[0].sparse:
        out[name + ".len"] = np.concatenate([np.diff(c.sparse[name].offsets) for c in chunks])
        out[name + ".ids"] = np.concatenate([c.sparse[name].ids for c in chunks])
        if chunks[0].sparse[name].weights is not None:
            out[name + ".w"] = np.concatenate([c.sparse[name].weights for c in chunks])
    for name in chunks[0].dense:
        out[name] = np.concatenate([c.dense[name] for c in chunks])
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# Good rows: Parquet and CSV give the same RawRows, values exact
# ---------------------------------------------------------------------------------------------


def test_parquet_and_csv_give_the_same_raw_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(table_format, "BATCH_ROWS", 16)  # several chunks per file
    rows = _rows(50)
    pq_file, csv_file = _parquet(tmp_path / "a.parquet", rows), _csv(tmp_path / "a.csv", rows)
    source = _open(tmp_path, SCHEMA, [pq_file, csv_file])
    chunks = _read_all(source)
    by_file = {f: [c for c in chunks if c.file == str(f)] for f in (pq_file, csv_file)}
    assert [len(c.rows) for c in by_file[pq_file]] == [16, 16, 16, 2]
    assert {c.header_lines for c in by_file[pq_file]} == {0} and {c.header_lines for c in by_file[csv_file]} == {1}
    assert all(not c.rejects for c in chunks)
    from_pq, from_csv = _concat(by_file[pq_file]), _concat(by_file[csv_file])
    _assert_same(from_pq, from_csv)
    # the values are the input's, exactly
    np.testing.assert_array_equal(from_pq["rows"], np.arange(1, 51))
    np.testing.assert_array_equal(from_pq["click"], rows["clk"])
    np.testing.assert_array_equal(from_pq["conversion"], rows["buy"])
    np.testing.assert_array_equal(from_pq["request_id"], rows["req"])
    np.testing.assert_array_equal(from_pq["user_id"], stable_id_hash(rows["uid"]))
    np.testing.assert_array_equal(from_pq["user.ids"], from_pq["user_id"])
    np.testing.assert_array_equal(from_pq["tags.ids"], [t for r in rows["tags"] for t in r])
    np.testing.assert_array_equal(from_pq["tags.len"], [len(r) for r in rows["tags"]])
    np.testing.assert_array_equal(from_pq["tags.w"], np.float32([w for r in rows["tag_w"] for w in r]))
    np.testing.assert_array_equal(from_pq["cat.ids"], [t for r in rows["cat"] for t in r])
    np.testing.assert_array_equal(from_pq["shop.ids"], rows["shop"])
    np.testing.assert_array_equal(from_pq["shop.len"], np.ones(50))
    np.testing.assert_array_equal(from_pq["price"], rows["price"])  # raw: the writer transforms
    assert from_pq["price"].dtype == np.float64 and from_pq["tags.w"].dtype == np.float32
    assert from_pq["user_id"].dtype == np.int64 and from_pq["tags.ids"].dtype == np.int64


def test_registered_as_table():
    assert FORMATS["table"] is table_format.FORMAT and table_format.FORMAT.name == "table"


def test_the_field_schema_comes_from_the_yaml(tmp_path):
    rows = _rows(3)
    schema = _open(tmp_path, SCHEMA, [_parquet(tmp_path / "a.parquet", rows)]).schema
    assert schema.names == ["user", "tags", "cat", "shop"]
    assert schema["tags"].multi_valued and schema["tags"].weighted and schema["tags"].mapping == "hash"
    assert schema["tags"].num_buckets == 64 and schema["cat"].min_count == 2 and schema["user"].group == "user"
    assert [(d.name, d.transform, d.standardize) for d in schema.dense] == [
        ("price", "log1p", True), ("qty", "none", False)]


def test_id_weight_pairs_in_text_and_a_custom_delimiter(tmp_path):
    rows = _rows(20, seed=3)
    pairs = {k: v for k, v in rows.items() if k != "tag_w"}
    pairs["tags"] = [";".join(f"{t}={w}" for t, w in zip(ts, ws)) for ts, ws in zip(rows["tags"], rows["tag_w"])]
    text = "\t".join(pairs) + "\n" + "\n".join(
        "\t".join(str(pairs[c][i]) if c != "cat" else ";".join(map(str, pairs[c][i])) for c in pairs)
        for i in range(20)) + "\n"
    (tmp_path / "p.tsv").write_text(text, encoding="utf-8")
    schema = SCHEMA.replace("weight_column: tag_w,", "") + 'csv: {delimiter: "\\t", list_delimiter: ";", ' \
                                                           'weight_delimiter: "="}\n'
    from_pairs = _concat(_read_all(_open(tmp_path, schema, [tmp_path / "p.tsv"])))
    reference = _concat(_read_all(_open(tmp_path, SCHEMA, [_parquet(tmp_path / "a.parquet", rows)])))
    _assert_same(from_pairs, reference)


def test_string_ids_hash_their_text_whatever_the_column_type(tmp_path):
    schema = """\
    labels: {click: c, conversion: v}
    fields: [{name: item, group: item, id_type: string}, {name: kw, group: item, multi_valued: true,
              id_type: string}]
    """
    pq.write_table(pa.table({"c": [1, 0], "v": [1, 0], "item": [123, -4],
                             "kw": pa.array([["a", "b"], ["123"]])}), tmp_path / "a.parquet")
    (tmp_path / "a.csv").write_text("c,v,item,kw\n1,1, 123 ,a|b\n0,0,-4,123\n", encoding="utf-8")
    from_pq, from_csv = (_concat(_read_all(_open(tmp_path, textwrap.dedent(schema), [tmp_path / f])))
                         for f in ("a.parquet", "a.csv"))
    del from_pq["rows"], from_csv["rows"]
    np.testing.assert_array_equal(from_pq["item.ids"], stable_id_hash(["123", "-4"]))
    np.testing.assert_array_equal(from_pq["kw.ids"], stable_id_hash(["a", "b", "123"]))
    np.testing.assert_array_equal(from_pq["kw.ids"][2], from_pq["item.ids"][0])  # 123 and "123": one id
    for key in from_pq:
        if key not in ("user_id", "request_id"):
            np.testing.assert_array_equal(from_pq[key], from_csv[key], err_msg=key)


def test_dictionary_columns_text_ints_bool_labels_and_a_shared_table(tmp_path):
    schema = """\
    labels: {click: c, conversion: v}
    user_id: {column: u, id_type: string}
    fields:
      - {name: item, group: item, table: items}
      - {name: last_item, group: user, table: items}
      - {name: u, group: user, id_type: string}
    dense: [{name: x, column: x_text}]
    """
    pq.write_table(pa.table({
        "c": [True, False], "v": pa.array([1.0, 0.0]),
        "u": pa.array(["ann", "bo"]).dictionary_encode(),  # a pandas categorical
        "item": pa.array([" 42", "-7"]), "last_item": pa.array([42, 8], pa.int16()),
        "x_text": [" 2.5e1", "-.5"],
    }), tmp_path / "a.parquet")
    source = _open(tmp_path, textwrap.dedent(schema), [tmp_path / "a.parquet"])
    assert source.schema["item"].table_name == source.schema["last_item"].table_name == "items"
    [chunk] = _read_all(source)
    assert not chunk.rejects
    np.testing.assert_array_equal(chunk.click, [1, 0])
    np.testing.assert_array_equal(chunk.conversion, [1, 0])
    np.testing.assert_array_equal(chunk.sparse["item"].ids, [42, -7])
    np.testing.assert_array_equal(chunk.sparse["last_item"].ids, [42, 8])
    np.testing.assert_array_equal(chunk.user_id, stable_id_hash(["ann", "bo"]))
    np.testing.assert_array_equal(chunk.sparse["u"].ids, chunk.user_id)
    np.testing.assert_array_equal(chunk.dense["x"], [25.0, -0.5])


def test_missing_allowed_gives_zero_ids_and_no_user_column_gives_none(tmp_path):
    schema = """\
    labels: {click: c, conversion: v}
    fields: [{name: kw, group: item, multi_valued: true, allow_missing: true}]
    """
    (tmp_path / "a.csv").write_text("c,v,kw\n1,0,\n0,0,4|5\n", encoding="utf-8")
    [chunk] = _read_all(_open(tmp_path, textwrap.dedent(schema), [tmp_path / "a.csv"]))
    assert chunk.user_id is None and chunk.request_id is None and not chunk.rejects
    np.testing.assert_array_equal(chunk.sparse["kw"].offsets, [0, 0, 2])


# ---------------------------------------------------------------------------------------------
# Bad rows: each rejected with file, row (CSV: line) and reason; the rest kept
# ---------------------------------------------------------------------------------------------

BAD_CSV = """\
clk,buy,uid,req,tags,tag_w,cat,shop,price,qty
1,0,u1,5,7|9,0.5|2,1|2,3,10.5,1
x,0,u2,6,8,1,3,4,2,1
1,2,u2,6,8,1,3,4,2,1
,0,u2,6,8,1,3,4,2,1
1,0,,6,8,1,3,4,2,1
1,0,u2,6,8|,1|1,3,4,2,1
1,0,u2,6,8,,3,4,2,1
1,0,u2,6,8|9,1,3,4,2,1
1,0,u2,6,8,one,3,4,2,1
1,0,u2,6,8,1,3.5,4,2,1
1,0,u2,6,8,1,3,99999999999999999999,2,1
1,0,u2,6,8,1,3,4,abc,1
1,0,u2,6,8,1,3,4,2,
1,0,u2,6
1,0,u2,z6,8,1,3,4,2,1

0,0,u3,7,,,5,6,1e3,-2
"""

BAD_EXPECTED = [  # (row, reason, words in the detail)
    (2, "bad_label", "line 3: column 'clk': 'x' is not 0 or 1"),
    (3, "bad_label", "column 'buy': '2' is not 0 or 1"),
    (4, "missing_value", "column 'clk' is empty"),
    (5, "missing_value", "column 'uid' is empty"),
    (6, "bad_list", "column 'tags' (field tags): '8|' has an empty item"),
    (7, "bad_weight", "weight column 'tag_w' (field tags) is empty"),
    (8, "bad_weight", "field tags: 2 id(s) in 'tags' but 1 weight(s) in 'tag_w'"),
    (9, "bad_weight", "weight column 'tag_w' (field tags): 'one' is not numeric"),
    (10, "bad_id", "column 'cat' (field cat): '3.5' is not an integer id"),
    (11, "bad_id", "column 'shop' (field shop): '99999999999999999999' is not an integer id"),
    (12, "bad_dense_value", "column 'price': 'abc' is not a number"),
    (14, "wrong_column_count", "line 15: 4 cells, the header has 10"),
    (15, "bad_id", "column 'req': 'z6' is not an integer id"),
    (16, "missing_value", "line 17: column 'clk' is empty"),  # a blank line is a row of empty cells
]


@pytest.mark.parametrize("batch_rows", [4, 65_536])
def test_each_bad_row_is_rejected_with_file_row_and_reason(tmp_path, monkeypatch, batch_rows):
    monkeypatch.setattr(table_format, "BATCH_ROWS", batch_rows)
    path = _write(tmp_path / "bad.csv", BAD_CSV)
    chunks = _read_all(_open(tmp_path, SCHEMA, [path]))
    rejects = [r for c in chunks for r in c.rejects]
    assert all(r.file == str(path) for r in rejects)
    got = [(r.row, r.reason) for r in rejects]
    assert got == [(row, reason) for row, reason, _ in BAD_EXPECTED]
    for r, (_, _, words) in zip(rejects, BAD_EXPECTED):
        assert words in r.detail, (r, words)
        assert r.detail.startswith(f"line {r.row + 1}: ")
    assert "clk='x'" in rejects[0].raw and rejects[-3].raw == "1,0,u2,6"
    kept = _concat([c for c in chunks if len(c.rows)])
    # the good rows (the last one after the blank line) and row 13, whose empty dense value is passed
    # on as NaN: the writer rejects it (dense_not_finite), as it does a NaN in Parquet
    np.testing.assert_array_equal(kept["rows"], [1, 13, 17])
    assert np.isnan(kept["qty"][1]) and kept["price"][2] == 1000.0 and kept["qty"][2] == -2.0
    assert len(kept["rows"]) + len(rejects) == 17  # every data row accounted for
    np.testing.assert_array_equal(kept["tags.len"], [2, 1, 0])  # empty tags allowed here
    np.testing.assert_array_equal(kept["tags.w"], np.float32([0.5, 2, 1]))


def test_a_cell_that_is_not_utf8_rejects_its_row_only(tmp_path):
    rows = _rows(3)
    path = _csv(tmp_path / "a.csv", rows)
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"user-", b"us\xffer-", 1)
    path.write_bytes(b"\n".join(lines))
    chunks = _read_all(_open(tmp_path, SCHEMA, [path]))
    [reject] = [r for c in chunks for r in c.rejects]
    assert (reject.row, reject.reason) == (2, "bad_encoding")
    assert reject.detail.startswith("line 3: column 'uid': not UTF-8 text (b'us\\xffer-")
    np.testing.assert_array_equal(_concat(chunks)["rows"], [1, 3])


def test_quoting_off_a_stray_quote_costs_one_row(tmp_path):
    text = 'c,v,name\n1,0,"ann\n0,0,bo\n1,1,"x, y"\n'
    (tmp_path / "a.csv").write_text(text, encoding="utf-8")
    schema = """\
    labels: {click: c, conversion: v}
    fields: [{name: name, group: user, id_type: string}]
    %s
    """
    quoted = _read_all(_open(tmp_path, textwrap.dedent(schema % ""), [tmp_path / "a.csv"]))
    # standard CSV: the open quote runs to the next one, joining lines 2-4 into one bad row
    assert sum(len(c) for c in quoted) + sum(len(c.rejects) for c in quoted) < 3
    unquoted = _read_all(_open(tmp_path, textwrap.dedent(schema % "csv: {quoting: false}"), [tmp_path / "a.csv"]))
    kept = _concat([c for c in unquoted if len(c)])
    np.testing.assert_array_equal(kept["rows"], [1, 2])
    np.testing.assert_array_equal(kept["name.ids"], stable_id_hash(['"ann', "bo"]))
    [reject] = [r for c in unquoted for r in c.rejects]  # "x, y" is two cells without quoting
    assert (reject.row, reject.reason) == (3, "wrong_column_count")


def test_a_csv_error_beyond_one_row_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(table_format, "CSV_BLOCK_BYTES", 64)
    rows = _rows(3)
    path = _csv(tmp_path / "a.csv", rows)
    text = path.read_text().splitlines()
    text[2] = text[2].replace("user-", '"user-', 1)  # an open quote running past the block
    path.write_text("\n".join(text + ["x" * 200]) + "\n")
    with pytest.raises(PrepareError, match=r"a\.csv: unreadable CSV from data row \d+ \(line \d+\) on: "):
        _read_all(_open(tmp_path, SCHEMA, [path]))


def test_parquet_bad_values_name_the_row(tmp_path):
    schema = """\
    labels: {click: c, conversion: v}
    user_id: u
    fields: [{name: kw, group: item, multi_valued: true}, {name: big, group: item}]
    dense: [x]
    """
    pq.write_table(pa.table({
        "c": pa.array([1, 1, None, 1, 1, 1, 1], pa.int8()),
        "v": [0, 0, 0, 0, 0, 0, 0],
        "u": pa.array([1, 2, 3, None, 5, 6, 7], pa.int64()),
        "kw": pa.array([[1], [1, None], [1], [1], None, [], [2]], pa.list_(pa.int64())),
        "big": pa.array([1, 2, 3, 4, 5, 6, 2**64 - 1], pa.uint64()),
        "x": [0.5, 1.0, 1.0, 1.0, 1.0, float("nan"), 1.0],
    }), tmp_path / "a.parquet", row_group_size=3)
    chunks = _read_all(_open(tmp_path, textwrap.dedent(schema), [tmp_path / "a.parquet"]))
    rejects = [(r.row, r.reason) for c in chunks for r in c.rejects]
    assert rejects == [(2, "bad_list"), (3, "missing_value"), (4, "missing_value"), (5, "missing_value"),
                       (7, "bad_id")]
    assert not any(r.detail.startswith("line") for c in chunks for r in c.rejects)  # Parquet: rows
    kept = _concat(chunks)
    np.testing.assert_array_equal(kept["rows"], [1, 6])
    np.testing.assert_array_equal(kept["kw.len"], [1, 0])  # an empty list is a value: zero ids
    assert np.isnan(kept["x"][1])  # NaN passes as missing: the writer rejects it (non-finite)


# ---------------------------------------------------------------------------------------------
# Open-time errors: before any row is read
# ---------------------------------------------------------------------------------------------


def test_a_missing_column_is_an_error_naming_file_and_column(tmp_path):
    rows = _rows(4)
    good = _parquet(tmp_path / "a.parquet", rows)
    no_price = {k: v for k, v in rows.items() if k != "price"}
    bad_csv = _csv(tmp_path / "b.csv", no_price)
    with pytest.raises(PrepareError, match=r"b\.csv: missing column\(s\) \['price'\]"):
        _open(tmp_path, SCHEMA, [good], test=[bad_csv])
    pq.write_table(pa.table({k: v for k, v in rows.items() if k not in ("shop", "tag_w")}), tmp_path / "c.parquet")
    with pytest.raises(PrepareError, match=r"c\.parquet: missing column\(s\) \['tag_w', 'shop'\]"):
        _open(tmp_path, SCHEMA, [good, tmp_path / "c.parquet"])


def test_a_column_named_twice_is_an_error_and_bom_crlf_are_fine(tmp_path):
    rows = _rows(2)
    path = _csv(tmp_path / "a.csv", rows)
    text = path.read_text()
    (tmp_path / "b.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    a, b = (_concat(_read_all(_open(tmp_path, SCHEMA, [tmp_path / f]))) for f in ("a.csv", "b.csv"))
    _assert_same(a, b)
    header, rest = text.split("\n", 1)
    (tmp_path / "c.csv").write_text(header + ",uid\n" + rest.replace("\n", ",x\n"))
    with pytest.raises(PrepareError, match=r"c\.csv: column\(s\) \['uid'\] appear more than once"):
        _open(tmp_path, SCHEMA, [tmp_path / "c.csv"])


@pytest.mark.parametrize("column,array,words", [
    ("shop", pa.array([1.5] * 4), "field shop needs integer or text ids (a float is not an id)"),
    ("cat", pa.array([[1.0]] * 4), "field cat needs integer or text ids"),
    ("shop", pa.array([[1]] * 4), "field shop is single-valued but the column is a list"),
    ("price", pa.array([[1.0]] * 4), "a dense column must hold numbers or text"),
    ("clk", pa.array([[1]] * 4), "a label column"),
    ("req", pa.array([1.0] * 4), "an id column must hold integers or text"),
    ("tag_w", pa.array([[True]] * 4), "a weight column must hold numbers"),
])
def test_an_unusable_parquet_type_names_file_column_and_type(tmp_path, column, array, words):
    rows = _rows(4)
    path = _parquet(tmp_path / "a.parquet", rows)
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index(column), column, array)
    pq.write_table(table, path)
    with pytest.raises(PrepareError) as err:
        _open(tmp_path, SCHEMA, [path])
    message = str(err.value)
    stored_type = pq.read_schema(path).field(column).type
    assert f"a.parquet: column {column!r} has type {stored_type}: " in message and words in message


def test_paths_globs_and_extensions(tmp_path):
    rows = _rows(3)
    for name in ("p2.parquet", "p1.parquet"):
        _parquet(tmp_path / name, rows)
    source = _open(tmp_path, SCHEMA, [Path(str(tmp_path / "p*.parquet"))], test=[tmp_path / "p2.parquet"])
    assert source.files() == {"train": [tmp_path / "p1.parquet", tmp_path / "p2.parquet"],
                              "test": [tmp_path / "p2.parquet"]}
    assert [c.file for c in source.read("train")] == [str(tmp_path / "p1.parquet"), str(tmp_path / "p2.parquet")]
    with pytest.raises(PrepareError, match=r"--valid .*q\*\.parquet: the pattern matches no file"):
        _open(tmp_path, SCHEMA, [tmp_path / "p1.parquet"], valid=[Path(str(tmp_path / "q*.parquet"))])
    with pytest.raises(PrepareError, match=r"--train .*nope\.csv: no such file"):
        _open(tmp_path, SCHEMA, [tmp_path / "nope.csv"])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(PrepareError, match=r"x\.json: cannot tell the file type"):
        _open(tmp_path, SCHEMA, [tmp_path / "x.json"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PrepareError, match=r"empty\.csv: empty file: a CSV input needs a header row"):
        _open(tmp_path, SCHEMA, [tmp_path / "empty.csv"])


# ---------------------------------------------------------------------------------------------
# The table schema YAML: strict, file:line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,line,words", [
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: item}\nfeilds: []\n", 4,
     "table schema: unknown key 'feilds'"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: item,\n     multivalued: true}\n", 4,
     "fields[0] (a): unknown key 'multivalued'"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: item}\n  - {name: b, group: item,"
     " min_count: two}\n", 4, "fields[1] (b).min_count: must be a int, got 'two'"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: items}\n", 3,
     "fields[0] (a).group: 'items' is not one of"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: item, multi_valued: 'yes'}\n", 3,
     "multi_valued: must be a bool"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: item, mapping: hash}\n", 3,
     "mapping 'hash' needs num_buckets > 0"),
    ("labels: {click: c}\nfields:\n  - {name: a, group: item}\n", 1, "labels: needs 'conversion'"),
    ("labels: {click: c, conversion: v,\n  conversion_requires_click: false}\nfields: [{name: a, group: item}]\n",
     2, "labels.conversion_requires_click: False is not one of [True]"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: item}\ndense:\n  - {name: a}\n", 1,
     "duplicate name(s) ['a']"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: user_id, group: user}\n", 3,
     "name 'user_id' must match"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: item}\ndense:\n  - {name: d, transform: log}\n",
     5, "dense[0] (d).transform: 'log' is not one of"),
    ("labels: {click: c, conversion: v}\ncsv: {delimiter: ';;'}\nfields:\n  - {name: a, group: item}\n", 2,
     "csv.delimiter: must be one character"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: item}\nuser_id: {col: u}\n", 4,
     "user_id: unknown key 'col'"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: item, weight_column: w}\n", 3,
     "only a 'weighted: true' field has weights"),
    ("labels: {click: c, conversion: v}\nfields:\n  - {name: a, group: item}\n  - {name: a, group: item}\n", 3,
     "fields:"),  # a duplicate *YAML key* is yaml_strict's; a duplicate field name is ours
])
def test_schema_errors_name_file_and_line(tmp_path, text, line, words):
    path = _write(tmp_path / "s.yaml", text)
    with pytest.raises(TableSchemaError) as err:
        load_table_schema(path)
    message = str(err.value)
    if words == "fields:":
        assert message.startswith(f"{path}:1: fields/dense: duplicate name(s) ['a']")
        return
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message, message


def test_yaml_syntax_and_duplicate_keys_are_errors_with_a_line(tmp_path):
    path = _write(tmp_path / "s.yaml", "labels: {click: c, conversion: v}\nfields: []\nfields: [1]\n")
    with pytest.raises(ValueError, match=r"s\.yaml:3:1: duplicate key 'fields' \(first at line 2\)"):
        load_table_schema(path)
    args = argparse.Namespace(table_schema=str(path), train=["x.csv"], valid=None, test=None)
    with pytest.raises(PrepareError, match=r"s\.yaml:3:1: duplicate key"):
        TableFormat().open(args)
    args.table_schema = None
    with pytest.raises(PrepareError, match="needs --table-schema"):
        TableFormat().open(args)
    args.table_schema, args.schema = str(path), "aliccp"
    with pytest.raises(PrepareError, match="--schema: not used by --format table"):
        TableFormat().open(args)


# ---------------------------------------------------------------------------------------------
# The worked example of docs/formats-table.md is real
# ---------------------------------------------------------------------------------------------

def test_the_documented_example_reads_the_same_from_csv_and_parquet(tmp_path):
    schema, train, test = write_doc_example(tmp_path / "shop")
    args = argparse.Namespace(table_schema=str(schema), train=[str(tmp_path / "shop" / "train-*.csv")],
                              valid=None, test=[str(test)])
    source = TableFormat().open(args)
    [from_csv], [from_pq] = list(source.read("train")), list(source.read("test"))
    assert not from_csv.rejects and len(from_csv) == 6
    a, b = _concat([from_csv]), _concat([from_pq])
    _assert_same(a, b)
    np.testing.assert_array_equal(a["keywords.len"], [2, 2, 1, 1, 0, 2])
    np.testing.assert_array_equal(a["keywords.ids"][:2], stable_id_hash(["red shoes", "sale"]))
    np.testing.assert_array_equal(a["tags.ids"], [3, 8, 3, 11, 3, 8, 3, 11])
    np.testing.assert_array_equal(a["tags.w"], np.float32([1, 0.5, 1, 2, 0.25, 1, 1, 1]))
    np.testing.assert_array_equal(a["request_id"], [101, 101, 102, 102, 103, 104])
    assert TableFormat().options(args)["table_schema"]["labels"]["click"] == "clicked"
    described = source.describe()["files"]
    assert described[str(test)] == {"kind": "parquet", "ignored_columns": []}
    assert described[str(tmp_path / "shop" / "train-0.csv")]["kind"] == "csv"


# ---------------------------------------------------------------------------------------------
# Property: any text ids and numbers read the same from Parquet and from a CSV writer's output
# ---------------------------------------------------------------------------------------------

_ID_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters="|:"),
                   min_size=1, max_size=8)
_ROW = st.tuples(
    st.booleans(), _ID_TEXT, st.lists(_ID_TEXT, max_size=3),
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False, width=64),
)


@settings(max_examples=15, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing example is printed anyway
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=st.lists(_ROW, min_size=1, max_size=12))
def test_property_parquet_and_csv_agree(tmp_path_factory, rows):
    """Strings with quotes, commas, non-ASCII letters; int64 extremes; any finite float (CSV text
    written by pyarrow, which quotes what needs it)."""
    folder = tmp_path_factory.mktemp("prop")
    schema = """\
    labels: {click: c, conversion: v}
    user_id: {column: u, id_type: string}
    fields:
      - {name: kw, group: item, multi_valued: true, id_type: string, allow_missing: true}
      - {name: big, group: item}
    dense: [x]
    """
    table = pa.table({
        "c": pa.array([int(r[0]) for r in rows], pa.int8()), "v": pa.array([0] * len(rows), pa.int8()),
        "u": [r[1] for r in rows], "kw": pa.array([r[2] for r in rows], pa.list_(pa.string())),
        "big": pa.array([r[3] for r in rows], pa.int64()), "x": [r[4] for r in rows],
    })
    pq.write_table(table, folder / "a.parquet")
    text_table = table.set_column(3, "kw", pa.array(["|".join(r[2]) for r in rows]))
    pacsv.write_csv(text_table, folder / "a.csv")
    from_pq, from_csv = (_concat(_read_all(_open(folder, textwrap.dedent(schema), [folder / f])))
                         for f in ("a.parquet", "a.csv"))
    _assert_same(from_pq, from_csv)
    np.testing.assert_array_equal(from_pq["user_id"], stable_id_hash([r[1] for r in rows]))
    np.testing.assert_array_equal(from_pq["big.ids"], [r[3] for r in rows])
    np.testing.assert_array_equal(from_pq["x"], [r[4] for r in rows])
