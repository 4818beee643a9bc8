"""``--format table`` end to end: CSV + Parquet files and a table schema -> ``ctnocvr data prepare`` ->
train a few steps -> eval. Counts, labels, dense values (after the documented transforms) and ids
(mapped back through the vocabulary) round-trip exactly; GAUC groups by the schema's user column."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _table_example import doc_block, write_doc_example

from ctnocvr_rec.cli import main as cli_main
from ctnocvr_rec.config import load_config
from ctnocvr_rec.data.formats.base import stable_id_hash
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.train.api import evaluate_checkpoint, run_in_process
from ctnocvr_rec.train.metrics import grouped_auc


def log1p_signed(x: np.ndarray) -> np.ndarray:
    """The documented ``transform: log1p`` (docs/formats-table.md), written out here on purpose."""
    return np.sign(x) * np.log1p(np.abs(x))


SCHEMA = """\
labels: {click: clicked, conversion: bought}
user_id: {column: %(user_column)s, id_type: string}
request_id: pageview
fields:
  - {name: user, group: user, id_type: string}
  - {name: category, group: item}
  - {name: shop, group: item, mapping: hash, num_buckets: 50}
  - {name: keywords, group: context, multi_valued: true, id_type: string, allow_missing: true, min_count: 2}
  - {name: tags, group: item, multi_valued: true, weighted: true, allow_missing: true}
dense:
  - {name: price, transform: log1p, standardize: true}
  - {name: age}
"""
COLUMNS = ["clicked", "bought", "user", "region", "pageview", "category", "shop", "keywords", "tags", "price", "age"]
WORDS = ["red", "shoes", "sale", "lamp", "led", "desk", "oak", "blue"]


def make_rows(n: int, seed: int) -> list[dict]:
    """``n`` good rows with a planted click signal (category) and per-user click rates."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        user = int(rng.integers(0, 40))
        category = int(rng.integers(0, 20))
        p_click = 0.15 + 0.6 * (category < 8) * (user % 3 != 0)
        click = int(rng.random() < p_click)
        tags = rng.integers(0, 30, size=int(rng.integers(0, 3)))
        rows.append({
            "clicked": click,
            "bought": int(click and rng.random() < 0.4),
            "user": f"user-{user}",
            "region": f"region-{user % 4}",  # a coarser grouping of the same rows
            "pageview": 1000 + i // 3,
            "category": category,
            "shop": int(rng.integers(0, 500)),
            "keywords": [str(w) for w in rng.choice(WORDS, size=int(rng.integers(0, 3)), replace=False)],
            "tags": [(int(t), float(rng.integers(1, 9)) / 4) for t in tags],
            "price": float(rng.integers(1, 4000)) / 4,
            "age": float(rng.integers(18, 70)),
        })
    return rows


def csv_line(row: dict) -> str:
    cells = dict(row)
    cells["keywords"] = "|".join(row["keywords"])
    cells["tags"] = "|".join(f"{t}:{w}" for t, w in row["tags"])
    return ",".join(str(cells[c]) for c in COLUMNS)


#: bad rows inserted into the first train CSV after good row 10: (csv line, reason, who rejects it)
BAD_LINES = [
    ("2,0,user-1,region-1,1,3,4,,,10,30", "bad_label"),
    ("1,0,,region-1,1,3,4,,,10,30", "missing_value"),
    ("1,0,user-1,region-1,1,3.5,4,,,10,30", "bad_id"),
    ("1,0,user-1,region-1,1,3,4,red||sale,,10,30", "bad_list"),
    ("1,0,user-1,region-1,1,3,4,,7,10,30", "bad_weight"),
    ("1,0,user-1,region-1,1,3,4,,,ten,30", "bad_dense_value"),
    ("1,0,user-1,region-1,1,3,4", "wrong_column_count"),
    ("0,1,user-1,region-1,1,3,4,,,10,30", "invalid_label_pair"),  # the writer's
    ("1,0,user-1,region-1,1,3,4,,,,30", "dense_not_finite"),  # missing dense: NaN -> the writer
]


def write_inputs(folder: Path) -> dict:
    """Two train CSV files (bad lines in the first), a Parquet test file; returns the good rows in
    ``sample_id`` order with their split and the expected rejects."""
    folder.mkdir(parents=True)
    train, test = make_rows(900, seed=1), make_rows(300, seed=2)
    header = ",".join(COLUMNS)
    first = [csv_line(r) for r in train[:10]] + [line for line, _ in BAD_LINES] + [csv_line(r) for r in train[10:500]]
    (folder / "train-a.csv").write_text(header + "\n" + "\n".join(first) + "\n", encoding="utf-8")
    (folder / "train-b.csv").write_text(header + "\n" + "\n".join(csv_line(r) for r in train[500:]) + "\n",
                                        encoding="utf-8")
    tag_ids = [[t for t, _ in r["tags"]] for r in test]
    pq.write_table(pa.table({
        "clicked": pa.array([r["clicked"] for r in test], pa.int8()),
        "bought": pa.array([bool(r["bought"]) for r in test]),
        **{c: [r[c] for r in test] for c in ("user", "region", "pageview", "category", "shop", "price", "age")},
        "keywords": pa.array([r["keywords"] for r in test], pa.list_(pa.string())),
        "tags": ["|".join(f"{t}:{w}" for t, w in r["tags"]) for r in test],  # text cells: id:weight pairs
    }), folder / "test.parquet", row_group_size=100)
    assert sum(map(len, tag_ids)) > 0
    # sample_id: data-row index over train-a, train-b, test (rejected rows keep theirs)
    sample_ids = list(range(10)) + list(range(10 + len(BAD_LINES), 500 + len(BAD_LINES)))
    sample_ids += list(range(500 + len(BAD_LINES), 900 + len(BAD_LINES)))
    sample_ids += list(range(900 + len(BAD_LINES), 1200 + len(BAD_LINES)))
    good = [dict(r, sample_id=s, split_in="train" if k < 900 else "test")
            for k, (r, s) in enumerate(zip(train + test, sample_ids))]
    rejects = [(str(folder / "train-a.csv"), 11 + k, reason) for k, (_, reason) in enumerate(BAD_LINES)]
    return {"good": good, "rejects": rejects}


def prepare(folder: Path, out: Path, user_column: str = "user") -> int:
    schema = folder / f"schema-{user_column}.yaml"
    schema.write_text(SCHEMA % {"user_column": user_column}, encoding="utf-8")
    return cli_main(["data", "prepare", "--format", "table", "--table-schema", str(schema),
                     "--train", str(folder / "train-*.csv"), "--test", str(folder / "test.parquet"),
                     "--out", str(out), "--rows-per-shard", "256", "--valid-fraction", "0.2",
                     "--no-progress"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("table_e2e")
    inputs = write_inputs(root / "in")
    assert prepare(root / "in", root / "prepared") == 0
    return root, inputs


def read_split(root: Path, split: str) -> pa.Table:
    manifest = json.loads((root / "manifest.json").read_text())
    return pa.concat_tables([pq.read_table(root / f) for f in manifest["splits"][split]["files"]])


def test_counts_and_rejects(prepared):
    root, inputs = prepared
    manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    r = manifest["rejects"]
    assert r["rows_in"] == 1200 + len(BAD_LINES) and r["rows_rejected"] == len(BAD_LINES)
    assert r["rows_written"] == 1200 == sum(manifest["splits"][s]["rows"] for s in ("train", "valid", "test"))
    assert manifest["splits"]["test"]["rows"] == 300
    assert 100 < manifest["splits"]["valid"]["rows"] < 260  # ~20% of 900 carved from train
    good = inputs["good"]
    for split in ("train", "valid", "test"):
        table = read_split(root / "prepared", split)
        assert manifest["splits"][split]["clicks"] == int(np.sum(table.column("click").to_numpy()))
    assert sum(r["clicked"] for r in good) == sum(manifest["splits"][s]["clicks"] for s in manifest["splits"])
    with open(root / "prepared" / "rejects" / "rejects.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert [(file, int(row), reason) for file, row, reason, *_ in rows] == inputs["rejects"]
    described = manifest["input"]["files"]
    assert described[str(root / "in" / "train-a.csv")] == {"kind": "csv", "ignored_columns": ["region"]}
    assert described[str(root / "in" / "test.parquet")]["kind"] == "parquet"
    assert manifest["input"]["options"]["table_schema"]["user_id"] == {"column": "user", "id_type": "string"}
    by_reason = r["by_file_and_reason"][str(root / "in" / "train-a.csv")]
    assert sum(by_reason.values()) == len(BAD_LINES)


def test_values_round_trip_exactly(prepared):
    root, inputs = prepared
    pset = PreparedSet.open(root / "prepared")
    manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    stats = manifest["dense_stats"]
    tables = {s: read_split(root / "prepared", s) for s in ("train", "valid", "test")}
    by_sample = {}
    for split, table in tables.items():
        for i, sid in enumerate(table.column("sample_id").to_pylist()):
            by_sample[sid] = (split, i)
    good = inputs["good"]
    assert sorted(by_sample) == [r["sample_id"] for r in good]
    # vocabularies back to raw ids
    back = {}
    for name in ("user", "category", "keywords", "tags"):
        vocab = pq.read_table(root / "prepared" / "vocab" / f"{name}.parquet").to_pydict()
        back[name] = {m: raw for raw, m in zip(vocab["raw_id"], vocab["mapped_id"]) if m != 0}
    train_rows = [r for r in good if by_sample[r["sample_id"]][0] == "train"]
    # standardisation fitted on the train split only, after the transform (population std)
    price_t = log1p_signed(np.array([r["price"] for r in train_rows]))
    assert stats["price"]["mean"] == pytest.approx(price_t.mean(), rel=1e-12)
    assert stats["price"]["std"] == pytest.approx(price_t.std(), rel=1e-12)
    checked = 0
    for r in good:
        split, i = by_sample[r["sample_id"]]
        assert (split == "test") == (r["split_in"] == "test")
        t = tables[split]
        row = {c: t.column(c)[i].as_py() for c in t.column_names}
        assert (row["click"], row["conversion"]) == (r["clicked"], r["bought"])
        assert row["user_id"] == stable_id_hash([r["user"]])[0] and row["request_id"] == r["pageview"]
        expected_price = np.float32((log1p_signed(np.array([r["price"]]))[0] - stats["price"]["mean"])
                                    / stats["price"]["std"])
        assert np.float32(row["price__d"]) == expected_price
        assert row["age__d"] == r["age"]  # no transform, no standardisation
        assert back["user"].get(row["user"][0]) == stable_id_hash([r["user"]])[0]
        assert back["category"][row["category"][0]] == r["category"]  # every category occurs on train
        assert row["shop"] == [r["shop"] % 50]
        kw = [back["keywords"].get(m, "oov") for m in row["keywords"]]
        assert kw == [stable_id_hash([w])[0] if m != 0 else "oov" for w, m in zip(r["keywords"], row["keywords"])]
        assert len(row["keywords"]) == len(r["keywords"])
        assert [back["tags"].get(m) for m in row["tags"]] == [t if m else None for (t, _), m in
                                                              zip(r["tags"], row["tags"])]
        assert row["tags__w"] == [w for _, w in r["tags"]]
        checked += 1
    assert checked == 1200 and pset.rows("test") == 300


def _cfg(prepared_dir: Path, run_dir: Path, *extra: str):
    return load_config(None, [
        f"data.prepared_dir={prepared_dir}", f"train.run_dir={run_dir}", "data.batch_size=64",
        "data.eval_batch_size=128", "train.steps=6", "train.checkpoint_every_steps=0",
        "train.progress_bar=false", "train.device=cpu", "model.embedding_dim=4", "model.num_experts=2",
        "model.expert_hidden=[8]", "model.tower_hidden=[8]", "train.eval_every_steps=0", *extra,
    ])


def test_train_eval_and_gauc_groups_by_the_user_column(prepared):
    torch.set_num_threads(1)
    root, _ = prepared
    # same input, same fields; only the schema's user_id column differs (region: 4 groups, not 40)
    assert prepare(root / "in", root / "prepared_region", user_column="region") == 0
    by_user, by_region = read_split(root / "prepared", "test"), read_split(root / "prepared_region", "test")
    assert by_user.drop(["user_id"]).equals(by_region.drop(["user_id"]))
    assert len(set(by_user.column("user_id").to_pylist())) == 40
    assert set(by_region.column("user_id").to_pylist()) == set(stable_id_hash([f"region-{k}" for k in range(4)]))

    trained = run_in_process(_cfg(root / "prepared", root / "run"))
    assert trained["steps"] == 6
    a = evaluate_checkpoint(root / "run", split="test", save_predictions=True)
    predictions = pq.read_table(root / "run" / "predictions" / "test.parquet").to_pydict()
    assert sorted(predictions["user_id"]) == sorted(by_user.column("user_id").to_pylist())
    assert a["metrics"]["gauc_ctr"] == grouped_auc(np.array(predictions["user_id"]), np.array(predictions["click"]),
                                                   np.array(predictions["p_ctr"]))
    # the same checkpoint on the set whose user column is the region: same scores, other groups
    b = evaluate_checkpoint(root / "run", split="test", overrides=[f"data.prepared_dir={root / 'prepared_region'}"])
    assert b["metrics"]["auc_ctr"] == a["metrics"]["auc_ctr"]
    assert b["metrics"]["gauc_ctr"] != a["metrics"]["gauc_ctr"]
    assert np.isfinite(a["metrics"]["gauc_ctr"]) and np.isfinite(b["metrics"]["gauc_ctr"])


def test_the_documented_command_runs(tmp_path, monkeypatch):
    """docs/formats-table.md's command, on its example files, from the folder the docs assume."""
    schema, _, _ = write_doc_example(tmp_path / "logs")
    schema.rename(tmp_path / "shop.yaml")
    command = doc_block("table-example-command").replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:3] == ["ctnocvr", "data", "prepare"]
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv[1:] + ["--no-progress"]) == 0
    manifest = json.loads((tmp_path / "data" / "prepared" / "shop" / "manifest.json").read_text())
    assert manifest["rejects"]["rows_in"] == 12 and manifest["splits"]["test"]["rows"] == 6
    assert set(manifest["dense_stats"]) == {"price", "age"}
