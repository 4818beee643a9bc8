"""`ctnocvr data prepare`: raw Ali-CCP files -> Parquet shards, vocab, manifest, rejects.

Small hand-written raw files (every value checked) plus a small synthetic set (every row checked).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 (pa.ipc)
import pyarrow.parquet as pq
import pytest

from ctnocvr_rec.data import prepare as prep
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.data.rawformat import COMMON, SKELETON, FieldSlots, Reject, parse_chunk, parse_line
from ctnocvr_rec.data.schema import load_schema

SCHEMA_YAML = """
fields:
  - {name: "101", group: user}
  - {name: "121", group: user}
  - {name: "109_14", group: user, multi_valued: true, weighted: true}
  - {name: "205", group: item}
  - {name: "210", group: item, multi_valued: true}
  - {name: "508", group: combination, min_count: 2}
  - {name: "853", group: combination, weighted: true, mapping: hash, num_buckets: 7}
  - {name: "301", group: context}
"""


def item(field: str, fid: int, value: str = "1.0") -> str:
    return f"{field}\x02{fid}\x03{value}"


def common_line(key: str, items: list[str]) -> str:
    return f"{key},{len(items)},{chr(1).join(items)}"


def skeleton_line(sid: int, click: int, buy: int, key: str, items: list[str]) -> str:
    return f"{sid},{click},{buy},{key},{len(items)},{chr(1).join(items)}"


def write_raw(folder: Path, split: str, common: list[str], skeleton: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"common_features_{split}.csv").write_bytes(("\n".join(common) + "\n").encode())
    (folder / f"sample_skeleton_{split}.csv").write_bytes(("\n".join(skeleton) + "\n").encode())


@pytest.fixture
def schema_path(tmp_path: Path) -> Path:
    path = tmp_path / "schema.yaml"
    path.write_text(SCHEMA_YAML)
    return path


COMMON_TRAIN = [
    common_line(
        "ka", [item("101", 11), item("121", 500), item("109_14", 901, "0.5"), item("109_14", 902, "2.25")]
    ),
    common_line("kb", [item("101", 12), item("109_14", 901, "1.5"), item("999", 5)]),  # 999: not in schema
    common_line("kc", []),  # a request with no user features at all
]
SKELETON_TRAIN = [
    skeleton_line(
        1, 1, 1, "ka", [item("205", 7), item("210", 70), item("210", 71), item("508", 3), item("301", 1)]
    ),
    skeleton_line(
        2, 1, 0, "ka", [item("205", 8), item("210", 71), item("853", 40, "0.25"), item("853", 41, "3")]
    ),
    skeleton_line(3, 0, 0, "kb", [item("205", 7), item("508", 3), item("508", 4), item("301", 2)]),
    skeleton_line(4, 0, 0, "kc", [item("205", 9)]),
    skeleton_line(5, 1, 0, "kb", []),
]
COMMON_TEST = [common_line("ta", [item("101", 12), item("109_14", 903, "1.0"), item("121", 500)])]
SKELETON_TEST = [
    skeleton_line(6, 1, 0, "ta", [item("205", 7), item("205", 99), item("508", 3), item("853", 47)])
]


def run_prepare(raw: Path, out: Path, schema: Path | str, **kw) -> dict:
    kw.setdefault("valid_fraction", 0.0)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prep.prepare(prep.PrepareOptions(str(raw), str(out), schema=str(schema), **kw))


def read_split(out: Path, split: str) -> dict[int, dict]:
    """Rows of a split keyed by sample_id (asserts sample ids are unique), per-request fields joined."""
    rows: dict[int, dict] = {}
    for row in PreparedSet.open(out).read_table(split).to_pylist():
        assert row["sample_id"] not in rows
        rows[row["sample_id"]] = row
    return rows


def inverse_vocab(out: Path, field: str) -> dict[int, list[int]]:
    table = pq.read_table(out / "vocab" / f"{field}.parquet").to_pydict()
    inv: dict[int, list[int]] = {}
    for raw, mapped in zip(table["raw_id"], table["mapped_id"]):
        inv.setdefault(mapped, []).append(raw)
    return inv


def test_hand_written_round_trip_every_value(tmp_path: Path, schema_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_raw(raw, "train", COMMON_TRAIN, SKELETON_TRAIN)
    write_raw(raw, "test", COMMON_TEST, SKELETON_TEST)
    manifest = run_prepare(raw, out, schema_path)

    train, test = read_split(out, "train"), read_split(out, "test")
    assert sorted(train) == [1, 2, 3, 4, 5] and sorted(test) == [6]
    assert manifest["rejects"]["rows_in"] == 6 == manifest["rejects"]["rows_written"]
    assert manifest["splits"]["train"]["rows"] == 5 and manifest["splits"]["test"]["rows"] == 1

    # labels, ids
    assert [(train[s]["click"], train[s]["conversion"]) for s in range(1, 6)] == [
        (1, 1),
        (1, 0),
        (0, 0),
        (0, 0),
        (1, 0),
    ]
    assert [train[s]["user_id"] for s in range(1, 6)] == [11, 11, 12, -1, 12]
    assert [train[s]["request_id"] for s in range(1, 6)] == [0, 0, 1, 2, 1]
    assert test[6]["request_id"] == 3 and test[6]["user_id"] == 12  # test requests follow train's 3

    # vocab mapping: ranked by train count desc, raw id asc; min_count 2 sends rare ids to OOV 0
    vocab_205 = pq.read_table(out / "vocab" / "205.parquet").to_pydict()
    assert vocab_205 == {"raw_id": [7, 8, 9], "count": [2, 1, 1], "mapped_id": [1, 2, 3]}
    vocab_508 = pq.read_table(out / "vocab" / "508.parquet").to_pydict()
    assert vocab_508 == {"raw_id": [3, 4], "count": [2, 1], "mapped_id": [1, 0]}
    # user fields count impressions: 901 is in ka (2 rows) and kb (2 rows), 902 only in ka
    vocab_hist = pq.read_table(out / "vocab" / "109_14.parquet").to_pydict()
    assert vocab_hist == {"raw_id": [901, 902], "count": [4, 2], "mapped_id": [1, 2]}
    assert manifest["num_embeddings"] == {
        "101": 3, "121": 2, "109_14": 3, "205": 4, "210": 3, "508": 2, "853": 7, "301": 3,
    }  # fmt: skip

    # every value of every row, multi-values and weights in file order
    m205 = {7: 1, 8: 2, 9: 3}
    assert [train[s]["205"] for s in range(1, 6)] == [[m205[7]], [m205[8]], [m205[7]], [m205[9]], []]
    assert train[1]["210"] == [2, 1] and train[2]["210"] == [1]  # 71 seen twice -> 1, 70 -> 2
    assert train[1]["508"] == [1] and train[3]["508"] == [1, 0]  # 4 seen once: OOV
    assert train[2]["853"] == [40 % 7, 41 % 7] and train[2]["853__w"] == [0.25, 3.0]
    assert train[1]["853"] == [] and train[1]["853__w"] == []
    assert train[1]["109_14"] == [1, 2] and train[1]["109_14__w"] == [0.5, 2.25]
    assert train[3]["109_14"] == [1] and train[3]["109_14__w"] == [1.5]
    assert train[4]["109_14"] == [] and train[4]["101"] == [] and train[4]["121"] == []
    assert train[1]["121"] == [1] and train[3]["121"] == []
    assert [train[s]["301"] for s in (1, 3, 4)] == [[1], [2], []]
    # test reuses the train vocab: 99 and 903 unseen -> OOV, 47 hashed
    assert test[6]["205"] == [1, 0] and test[6]["508"] == [1] and test[6]["853"] == [47 % 7]
    assert test[6]["109_14"] == [0] and test[6]["109_14__w"] == [1.0] and test[6]["101"] == [2]
    # the field outside the schema is counted, not silently lost
    assert manifest["input_files"]["train"]["common"]["ignored_field_values"] == {"999": 1}
    # columns and types of the design contract
    schema = pq.read_schema(next((out / "train").glob("*.parquet")))
    assert str(schema.field("sample_id").type) == "int64" and str(schema.field("click").type) == "int8"
    # ids int32 (every table fits), lists and items non-nullable, no dictionary on list columns
    assert str(schema.field("853").type) == "list<element: int32 not null>"
    assert str(schema.field("853__w").type) == "list<element: float not null>"
    assert not schema.field("853").nullable and not schema.field("sample_id").nullable
    meta = pq.ParquetFile(next((out / "train").glob("*.parquet"))).metadata
    chunks = {meta.schema.column(c).path: meta.row_group(0).column(c) for c in range(meta.num_columns)}
    assert chunks["853.list.element"].compression.startswith("LZ4")
    assert not chunks["853.list.element"].has_dictionary_page

    # the user fields are stored once per request (the default layout), not on the rows
    user = ["101", "121", "109_14"]
    assert not set(user) & set(schema.names) and "109_14__w" not in schema.names
    entry = manifest["per_request"]
    assert entry["fields"] == user and entry["files"] == [
        {"file": "requests/train.arrow", "first_request_id": 0, "requests": 3},
        {"file": "requests/test.arrow", "first_request_id": 3, "requests": 1},
    ]
    requests = pa.ipc.open_file(str(out / "requests" / "train.arrow")).read_all()
    assert requests.column("109_14").to_pylist() == [[1, 2], [1], []]  # ka, kb, kc in file order
    assert requests.column("109_14__w").to_pylist() == [[0.5, 2.25], [1.5], []]
    assert str(requests.schema.field("109_14").type) == "list<element: int32 not null>"
    # mean ids per train row, each request counted once per row that references it (ka 2, kb 2, kc 1)
    assert entry["ids_per_row"]["train"]["109_14"] == pytest.approx((2 * 2 + 1 * 2 + 0) / 5)
    assert PreparedSet.open(out).ids_per_row("train")["109_14"] == pytest.approx(6 / 5)

    # the per-row layout stores the same rows with every field on them
    row_out = tmp_path / "per_row"
    row_manifest = run_prepare(raw, row_out, schema_path, user_features="per-row")
    assert "per_request" not in row_manifest and not (row_out / "requests").exists()
    assert set(user) <= set(pq.read_schema(next((row_out / "train").glob("*.parquet"))).names)
    assert read_split(row_out, "train") == train and read_split(row_out, "test") == test


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

BAD_COMMON = [
    common_line("ka", [item("101", 11)]),
    "kbad,2," + item("101", 12),  # line 2: feature_num says 2, one item
    common_line("ka", [item("101", 13)]),  # line 3: duplicate key
    "kx," + "1," + "101\x02abc\x031.0",  # line 4: non-numeric id
]
BAD_SKELETON = [
    skeleton_line(1, 1, 0, "ka", [item("205", 7)]),  # 1 ok
    "2,0,0,ka,1",  # 2 wrong column count
    "3,0,0,ka,2," + item("205", 7),  # 3 feature_num mismatch
    "4,0,0,ka,1,205\x027",  # 4 malformed item (no \x03)
    "5,0,0,ka,1,205\x02x7\x031.0",  # 5 non-numeric id
    "6,0,0,ka,1,205\x027\x03abc",  # 6 non-numeric value
    skeleton_line(7, 0, 0, "nope", [item("205", 7)]),  # 7 unknown common index
    skeleton_line(8, 0, 1, "ka", [item("205", 7)]),  # 8 click=0, buy=1
    skeleton_line(9, 0, 0, "kbad", [item("205", 7)]),  # 9 refers to a rejected common line
    "x10,0,0,ka,1," + item("205", 7),  # 10 non-numeric sample_id
    skeleton_line(11, 2, 0, "ka", [item("205", 7)]),  # 11 click=2
    skeleton_line(12, 1, 0, "ka", [item("205", 7), item("210", 1)]),  # 12 ok
]
EXPECTED_SKELETON_REJECTS = {
    2: "wrong_column_count",
    3: "feature_num_mismatch",
    4: "malformed_feature_item",
    5: "non_numeric",
    6: "non_numeric",
    7: "unknown_common_feature_index",
    8: "invalid_label_pair",
    9: "unknown_common_feature_index",
    10: "non_numeric",
    11: "bad_label",
}


def read_rejects(out: Path) -> list[dict[str, str]]:
    with open(out / "rejects" / "rejects.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_lands_in_rejects_with_reason_and_line(
    tmp_path: Path, schema_path: Path, workers: int
) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_raw(raw, "train", BAD_COMMON, BAD_SKELETON)
    manifest = run_prepare(raw, out, schema_path, workers=workers, chunk_mb=0.0001)  # many tiny chunks
    rejects = read_rejects(out)
    skeleton = {int(r["line"]): r for r in rejects if r["file"] == "sample_skeleton_train.csv"}
    common = {int(r["line"]): r for r in rejects if r["file"] == "common_features_train.csv"}
    assert {k: v["reason"] for k, v in skeleton.items()} == EXPECTED_SKELETON_REJECTS
    assert {k: v["reason"] for k, v in common.items()} == {
        2: "feature_num_mismatch",
        3: "duplicate_common_feature_index",
        4: "non_numeric",
    }
    assert "already defined at line 1" in common[3]["detail"]
    assert "common_features_train.csv:2 was rejected" in skeleton[9]["detail"]
    assert "not in common_features_train.csv" in skeleton[7]["detail"]
    assert skeleton[5]["detail"].startswith("field 205") and "x7" in skeleton[5]["detail"]
    assert skeleton[6]["raw"] == "6,0,0,ka,1,205\\x027\\x03abc"
    r = manifest["rejects"]
    assert (r["rows_in"], r["rows_written"], r["rows_rejected"]) == (12, 2, 10)
    assert r["rows_in"] == r["rows_written"] + r["rows_rejected"]
    assert r["common_rows_rejected"] == 3
    assert r["by_file_and_reason"]["sample_skeleton_train.csv"]["non_numeric"] == 3
    assert sorted(read_split(out, "train")) == [1, 12]
    # the duplicate key kept its first definition
    assert {row["user_id"] for row in read_split(out, "train").values()} == {11}


def test_strict_stops_at_first_bad_line(tmp_path: Path, schema_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_raw(raw, "train", COMMON_TRAIN, [SKELETON_TRAIN[0], "2,0,0,ka,1,205\x02x7\x031.0", "3,0,0,ka,1"])
    with pytest.raises(prep.PrepareError, match=r"sample_skeleton_train\.csv:2: non_numeric \(field 205"):
        run_prepare(raw, out, schema_path, strict=True)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written
    write_raw(raw, "train", ["ka,1,101\x0211\x031.0", "kb,3,101\x0212\x031.0"], SKELETON_TRAIN[:1])
    with pytest.raises(
        prep.PrepareError, match=r"common_features_train\.csv:2: feature_num_mismatch \(field"
    ):
        run_prepare(raw, out, schema_path, strict=True, workers=2)


def test_cli_strict_message(tmp_path: Path, schema_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = tmp_path / "raw"
    write_raw(raw, "train", COMMON_TRAIN, [SKELETON_TRAIN[0], skeleton_line(2, 0, 1, "ka", [])])
    parser = argparse.ArgumentParser()
    prep.add_arguments(parser)
    args = parser.parse_args(
        [
            "--raw-dir",
            str(raw),
            "--out",
            str(tmp_path / "o"),
            "--schema",
            str(schema_path),
            "--strict",
            "--no-progress",
            "--workers",
            "1",
        ]
    )
    with pytest.raises(prep.PrepareError) as err:
        prep.run(args)
    assert str(err.value).startswith(
        f"{raw / 'sample_skeleton_train.csv'}:2: invalid_label_pair (field click/buy"
    )
    args.strict = False
    assert prep.run(args) == 0
    assert "rows_in 2 = rows_written 1 + rows_rejected 1" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# synthetic data: every row, split rule, shuffle, idempotence
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctnocvr_rec.data import synth
    folder = tmp_path_factory.mktemp("synth_raw")
    synth.generate(synth.SynthConfig(rows_train=3000, rows_test=600, users=300, items=200, seed=3), folder)
    return folder


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_synth_round_trip_accounts_for_every_row_and_value(tmp_path: Path, synth_raw: Path) -> None:
    out = tmp_path / "out"
    schema_file = "aliccp"
    manifest = run_prepare(
        synth_raw, out, schema_file, valid_fraction=0.2, rows_per_shard=700, workers=2
    )
    schema = load_schema(schema_file)
    rows = {name: read_split(out, name) for name in ("train", "valid", "test")}
    assert manifest["rejects"]["rows_rejected"] == 0
    assert {k: len(v) for k, v in rows.items()} == {k: manifest["splits"][k]["rows"] for k in rows}
    assert len(manifest["splits"]["train"]["files"]) > 1  # several buckets

    inverse = {spec.name: inverse_vocab(out, spec.name) for spec in schema}
    user_specs, skel_specs = schema.user_fields, schema.skeleton_fields
    user_slots = FieldSlots(tuple(s.name for s in user_specs), tuple(s.weighted for s in user_specs))
    skel_slots = FieldSlots(tuple(s.name for s in skel_specs), tuple(s.weighted for s in skel_specs))
    oov_seen: set[str] = set()
    for split, names in (("train", ("train", "valid")), ("test", ("test",))):
        common = {}
        for line in (synth_raw / f"common_features_{split}.csv").read_bytes().splitlines():
            parsed = parse_line(line, COMMON, user_slots)
            assert not isinstance(parsed, Reject)
            common[parsed.key] = parsed
        out_rows = {sid: row for name in names for sid, row in rows[name].items()}
        lines = (synth_raw / f"sample_skeleton_{split}.csv").read_bytes().splitlines()
        assert sorted(out_rows) == sorted(int(line.split(b",")[0]) for line in lines)  # a permutation
        for line in lines:
            parsed = parse_line(line, SKELETON, skel_slots)
            assert not isinstance(parsed, Reject)
            row = out_rows[parsed.ints[0]]
            assert (row["click"], row["conversion"]) == (parsed.ints[1], parsed.ints[2])
            user = common[parsed.key]
            for spec in schema:
                source, slots = (user, user_slots) if spec.is_user else (parsed, skel_slots)
                k = slots.names.index(spec.name)
                raw_ids = source.ids[k]
                assert len(row[spec.name]) == len(raw_ids), (spec.name, line)
                for raw_id, mapped in zip(raw_ids, row[spec.name]):
                    # a mapped id decodes back to its raw id; OOV (0) only for ids below min_count
                    # on train or never seen there (valid/test rows)
                    if mapped:
                        assert raw_id in inverse[spec.name][mapped], spec.name
                    else:
                        assert all(raw_id not in v for m, v in inverse[spec.name].items() if m), spec.name
                        oov_seen.add(spec.name)
                if spec.weighted:
                    assert np.allclose(row[spec.weight_column], source.weights[k])
            assert row["user_id"] == (user.ids[user_slots.names.index("101")] or [-1])[0]
    assert "509" in oov_seen  # min_count 2 on a combination field does send ids to OOV
    # rows of one request share request_id; train and test ids do not collide
    assert not {r["request_id"] for r in rows["test"].values()} & {
        r["request_id"] for r in rows["train"].values()
    }


def test_split_rule_by_row_and_by_user(tmp_path: Path, synth_raw: Path) -> None:
    schema = "aliccp"
    by_row = run_prepare(synth_raw, tmp_path / "r", schema, valid_fraction=0.3, seed=5, workers=2)
    n_train, n_valid = by_row["splits"]["train"]["rows"], by_row["splits"]["valid"]["rows"]
    assert 0.25 < n_valid / (n_train + n_valid) < 0.35
    assert by_row["split_rule"]["by"] == "row" and by_row["split_rule"]["valid_fraction"] == 0.3
    valid_ids = set(read_split(tmp_path / "r", "valid"))
    expected = {s for s in range(1, 3001) if prep.seeded_unit(np.array([s]), 5, prep.SPLIT_STREAM)[0] < 0.3}
    assert valid_ids == expected  # the documented rule, exactly

    by_user = run_prepare(synth_raw, tmp_path / "u", schema, valid_fraction=0.3, split_by="user", workers=2)
    train_users = {r["user_id"] for r in read_split(tmp_path / "u", "train").values()}
    valid_users = {r["user_id"] for r in read_split(tmp_path / "u", "valid").values()}
    assert valid_users and train_users and not train_users & valid_users
    assert by_user["split_rule"]["by"] == "user"


def test_shuffled_idempotent_and_independent_of_workers(tmp_path: Path, synth_raw: Path) -> None:
    schema = "aliccp"
    a, b = tmp_path / "a", tmp_path / "b"
    run_prepare(synth_raw, a, schema, valid_fraction=0.1, rows_per_shard=1000, workers=1)
    run_prepare(synth_raw, b, schema, valid_fraction=0.1, rows_per_shard=1000, workers=2, chunk_mb=0.05)
    digests = file_digests(a)
    assert digests == file_digests(b)
    # shuffled: output order is not file order
    first = (
        pq.read_table(sorted((a / "train").glob("*.parquet"))[0], columns=["sample_id"]).column(0).to_pylist()
    )
    assert first != sorted(first)
    # an unchanged re-run is skipped, --force rebuilds the same bytes
    manifest_mtime = (a / "manifest.json").stat().st_mtime_ns
    run_prepare(synth_raw, a, schema, valid_fraction=0.1, rows_per_shard=1000)
    assert (a / "manifest.json").stat().st_mtime_ns == manifest_mtime
    run_prepare(synth_raw, a, schema, valid_fraction=0.1, rows_per_shard=1000, force=True)
    assert file_digests(a) == digests
    # a different seed changes the order, not the content
    c = tmp_path / "c"
    run_prepare(synth_raw, c, schema, valid_fraction=0.1, rows_per_shard=1000, seed=1)
    assert file_digests(c) != digests
    ids_a = {s for name in ("train", "valid", "test") for s in read_split(a, name)}
    ids_c = {s for name in ("train", "valid", "test") for s in read_split(c, name)}
    assert ids_a == ids_c
    # the manifest records source checksums
    manifest = PreparedSet.open(a).manifest
    src = manifest["sources"]["sample_skeleton_train.csv"]
    assert src["sha256"] == hashlib.sha256((synth_raw / "sample_skeleton_train.csv").read_bytes()).hexdigest()


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path, schema_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_raw(raw, "train", COMMON_TRAIN, SKELETON_TRAIN)
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(prep.PrepareError, match="not overwriting"):
        run_prepare(raw, out, schema_path)


# ---------------------------------------------------------------------------------------------
# the vectorised parser agrees with the exact per-line parser
# ---------------------------------------------------------------------------------------------


def _random_line(rnd: random.Random, i: int) -> str:
    items = []
    for _ in range(rnd.randint(0, 6)):
        name = rnd.choice(["205", "210", "853", "301", "999", "1234567890"])
        value = rnd.choice(["1.0", "0.693147", "2", "1e-3", ".5"])
        items.append(item(name, rnd.randint(0, 10 ** rnd.randint(1, 17)), value))
    click = int(rnd.random() < 0.3)
    return skeleton_line(i, click, int(click and rnd.random() < 0.3), f"k{rnd.randint(0, 9)}", items)


CORRUPTIONS = [
    lambda s: s.replace(",", ",,", 1),
    lambda s: s.replace("\x02", "", 1),
    lambda s: s.replace("\x03", "\x03\x03", 1),
    lambda s: s.replace("1.0", "1.x", 1),
    lambda s: s + "\x01",
    lambda s: "x" + s,
    lambda s: s.replace(",0,0,", ",0,1,", 1),
    lambda s: s.replace(",1,", ",2,", 1),
    lambda s: s.replace(",k", ",k\x01", 1),
    lambda s: s.replace("\x02", "\x021234567890123456789", 1),
    lambda s: s.replace("0.693147", "1e999", 1),
    lambda s: s.replace(",k", ",", 1),
    lambda s: s + "\r",
    lambda s: "",
    lambda s: s.replace("205\x02", "\x02", 1),
]


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_parser_matches_exact_parser(seed: int) -> None:
    rnd = random.Random(seed)
    slots = FieldSlots(("205", "210", "853", "301"), (False, False, True, False))
    lines = [_random_line(rnd, i) for i in range(1500)]
    lines = [rnd.choice(CORRUPTIONS)(s) if rnd.random() < 0.2 else s for s in lines]
    data = "\n".join(lines).encode()  # no trailing newline on purpose
    chunk = parse_chunk(data, SKELETON, slots)
    assert chunk.n_lines == len(lines)
    assert chunk.fast_lines > 0.6 * len(lines)
    expected_rejects, accepted = {}, []
    for i, line in enumerate(data.split(b"\n")):
        parsed = parse_line(line, SKELETON, slots)
        if isinstance(parsed, Reject):
            expected_rejects[i] = parsed.reason
        else:
            accepted.append((i, parsed))
    assert {r.line: r.reason for r in chunk.rejects} == expected_rejects
    assert len(set(expected_rejects.values())) >= 6
    assert chunk.line.tolist() == [i for i, _ in accepted]
    for j, (_, parsed) in enumerate(accepted):
        assert chunk.ints[j].tolist() == parsed.ints
        assert (int(chunk.key_h1[j]), int(chunk.key_h2[j])) == parsed.key_hash
        for k, csr in enumerate(chunk.slots):
            lo, hi = csr.offsets[j], csr.offsets[j + 1]
            assert csr.ids[lo:hi].tolist() == parsed.ids[k]
            if csr.weights is not None:
                assert np.allclose(csr.weights[lo:hi], parsed.weights[k])


def test_common_chunk_counts_ignored_fields() -> None:
    slots = FieldSlots(("101",), (False,))
    data = (
        "\n".join([common_line("a", [item("101", 1), item("150_14", 2, "0.5")]), common_line("b", [])]) + "\n"
    )
    chunk = parse_chunk(data.encode(), COMMON, slots)
    assert chunk.n_lines == 2 and not chunk.rejects
    assert chunk.ignored == {"150_14": 1}
    assert chunk.slots[0].offsets.tolist() == [0, 1, 1] and chunk.slots[0].ids.tolist() == [1]


def test_empty_test_split_and_crlf_lines(tmp_path: Path, schema_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_raw(raw, "train", COMMON_TRAIN, SKELETON_TRAIN)
    crlf = (raw / "sample_skeleton_train.csv").read_bytes().replace(b"\n", b"\r\n")
    (raw / "sample_skeleton_train.csv").write_bytes(crlf)
    (raw / "common_features_test.csv").write_bytes(b"")
    (raw / "sample_skeleton_test.csv").write_bytes(b"")
    with pytest.raises(prep.PrepareError, match=r"split test is empty: .*sample_skeleton_test\.csv has no rows"):
        run_prepare(raw, out, schema_path)
    assert not out.exists()
    manifest = run_prepare(raw, out, schema_path, allow_empty_split=True)
    assert manifest["splits"]["test"] == {"rows": 0, "clicks": 0, "conversions": 0, "files": []}
    assert manifest["rejects"]["rows_in"] == 5 == manifest["rejects"]["rows_written"]
    assert sorted(read_split(out, "train")) == [1, 2, 3, 4, 5]


def test_synth_prepare_load_round_trip(tmp_path: Path, synth_raw: Path) -> None:
    """synth -> prepare -> ParquetBatchDataset: every row once, every id, weight and label intact."""
    import ctnocvr_rec.data.dataset as dataset_mod  # a broken import must fail, not skip
    out = tmp_path / "out"
    run_prepare(synth_raw, out, "aliccp", valid_fraction=0.2, rows_per_shard=700)
    schema = load_schema("aliccp")
    for split in ("train", "valid", "test"):
        rows = read_split(out, split)
        seen: set[int] = set()
        for batch in dataset_mod.ParquetBatchDataset(out, split, batch_size=256):
            # unweighted tables' fields come without weights (the model sees 1.0), weighted ones with
            assert batch.sparse_features.weights_or_none() is None
            per_key = {**batch.sparse_features.to_dict(), **batch.weighted_features.to_dict()}
            features = {
                spec.name: [
                    jt.offsets().tolist(),
                    jt.values().tolist(),
                    jt.weights().tolist() if jt.weights_or_none() is not None else [1.0] * len(jt.values()),
                ]
                for spec, jt in ((s, per_key[s.feature_name]) for s in schema)
            }
            ctnocvr = batch.ctnocvr.tolist()
            for i, sid in enumerate(batch.sample_id.tolist()):
                assert sid not in seen
                seen.add(sid)
                row = rows[sid]
                assert (batch.click[i].item(), batch.conversion[i].item()) == (
                    row["click"],
                    row["conversion"],
                )
                assert ctnocvr[i] == float(row["click"] == 1 and row["conversion"] == 0)
                assert (
                    batch.user_id[i].item() == row["user_id"]
                    and batch.request_id[i].item() == row["request_id"]
                )
                for spec in schema:
                    offsets, values, weights = features[spec.name]
                    lo, hi = offsets[i], offsets[i + 1]
                    assert values[lo:hi] == row[spec.name]
                    # float32 weights compare exactly; unweighted fields carry 1.0
                    assert weights[lo:hi] == (row[spec.weight_column] if spec.weighted else [1.0] * (hi - lo))
        assert seen == set(rows)


@pytest.mark.parametrize("top_id", [20, 10**12])  # dense lookup table / binary search
def test_vocab_mapping_rank_min_count_and_oov(top_id: int) -> None:
    from ctnocvr_rec.data.schema import FieldSpec
    from ctnocvr_rec.data.vocab import FieldVocab

    vocab = FieldVocab.build(
        FieldSpec("x", "item", min_count=2), np.array([3, 5, 9, top_id]), np.array([5, 1, 2, 7])
    )
    # ranked by count: top_id (7) -> 1, 3 (5) -> 2, 9 (2) -> 3; 5 (1 < min_count) and unseen ids -> 0
    ids = np.array([3, 5, 9, top_id, 21, -4, 0, 10**15])
    assert vocab.map(ids).tolist() == [2, 0, 3, 1, 0, 0, 0, 0]
    assert vocab.num_embeddings == 4 and vocab.size == 3
    hashed = FieldVocab.build(
        FieldSpec("h", "item", mapping="hash", num_buckets=7), np.array([3]), np.array([1])
    )
    assert hashed.map(np.array([3, 10, 10**12])).tolist() == [3, 3, 10**12 % 7] and hashed.num_embeddings == 7


def test_vocab_lookup_table_starts_at_the_fields_first_id() -> None:
    """Ali-CCP ids are global across fields: a field whose ids start at 9 M gets a table over its own
    span, and maps exactly as the binary search does (ids below, inside gaps and above the span)."""
    from ctnocvr_rec.data.schema import FieldSpec
    from ctnocvr_rec.data.vocab import FieldVocab

    rng = np.random.default_rng(0)
    raw = np.unique(rng.integers(9_000_000, 9_050_000, 20_000))
    vocab = FieldVocab.build(FieldSpec("x", "item", min_count=2), raw, rng.integers(1, 9, len(raw)))
    table = vocab._dense_table()
    assert table is not None and len(table) == raw[-1] - raw[0] + 1  # not 9 M entries
    ids = np.concatenate([raw, raw - 1, raw + 1, [0, 8_999_999, 9_050_001, -3, 2**40]])
    lookup = vocab.map(ids)
    vocab._table = None  # the binary search path
    assert lookup.tolist() == vocab.map(ids).tolist()
    sparse = FieldVocab.build(FieldSpec("s", "item"), np.array([5, 10**6, 2 * 10**6]), np.array([1, 1, 1]))
    assert sparse._dense_table() is None  # 2 M span for 3 ids: binary search
