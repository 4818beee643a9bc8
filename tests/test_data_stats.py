"""`ctnocvr data stats` against a hand count of the same rows."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from _prepared_fixture import aliccp_schema, write_prepared

from ctnocvr_rec.data import stats as stats_mod
from ctnocvr_rec.data.prepared import read_manifest
from ctnocvr_rec.data.stats import compute_stats, format_stats


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared_stats")
    tables = write_prepared(root, aliccp_schema(), {"train": 180, "test": 45}, rows_per_file=64, row_group_size=20)
    return root, tables


def _hand_count(rows: list[dict], schema) -> dict:
    """Plain-Python reference: loops over rows, sets for distinct values."""
    table2 = {
        "users": len({r["user_id"] for r in rows if r["user_id"] != -1}),
        "items": len({i for r in rows for i in r["205"] if i != 0}),
        "impressions": len(rows),
        "clicks": sum(r["click"] for r in rows),
        "conversions": sum(r["conversion"] for r in rows),
    }
    table2["ctr"] = table2["clicks"] / table2["impressions"]
    table2["cvr"] = table2["conversions"] / table2["clicks"]
    fields = {}
    for spec in schema:
        ids = [i for r in rows for i in r[spec.name]]
        fields[spec.name] = {
            "cardinality": len({i for i in ids if i != 0}),
            "mean_len": len(ids) / len(rows),
            "max_len": max(len(r[spec.name]) for r in rows),
            "empty_share": sum(1 for r in rows if not r[spec.name]) / len(rows),
            "oov_share": sum(1 for i in ids if i == 0) / len(ids),
        }
    return {"table2": table2, "fields": fields}


def test_stats_match_a_hand_count(prepared):
    root, tables = prepared
    schema = aliccp_schema()
    got = compute_stats(root, ["train", "test"])
    for split in ("train", "test", "all"):
        rows = tables["train"].to_pylist() + tables["test"].to_pylist() if split == "all" else tables[split].to_pylist()
        want = _hand_count(rows, schema)
        for key, value in want["table2"].items():
            assert got["splits"][split]["table2"][key] == pytest.approx(value), (split, key)
        for name, expected in want["fields"].items():
            for key, value in expected.items():
                assert got["splits"][split]["fields"][name][key] == pytest.approx(value), (split, name, key)
    assert got["splits"]["train"]["fields"]["101"]["num_embeddings"] == 8  # from the manifest


def test_cli_prints_table_and_json(prepared, capsys):
    root, tables = prepared
    args = argparse.Namespace(prepared=str(root), split=["train"], schema=None, json=True)
    assert stats_mod.run(args) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["splits"]["train"]["table2"]["impressions"] == tables["train"].num_rows
    text = format_stats(parsed)
    assert "#conversion" in text and "109_14" in text


def test_missing_split_is_a_clear_error(prepared):
    root, _ = prepared
    with pytest.raises(FileNotFoundError, match="valid"):
        compute_stats(root, ["valid"])


def test_stats_and_prepared_helpers_do_not_import_torch():
    # `ctnocvr --help` / `ctnocvr data stats` must not pay torch's import time (~15 s on this machine)
    code = (
        "import sys\n"
        "import ctnocvr_rec.data.stats, ctnocvr_rec.data.prepared\n"
        "print(sorted(m for m in ('torch', 'torchrec') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_read_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": 1,\n oops}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"manifest.json: not valid JSON \(line 2"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "ctnocvr-prepared/1"}', encoding="utf-8")
    assert read_manifest(tmp_path) == {"format": "ctnocvr-prepared/1"}
