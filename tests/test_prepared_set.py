"""PreparedSet (one handle on manifest + schema) and the one shard writer (data/shards.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _prepared_fixture import aliccp_schema, fixture_num_embeddings, write_prepared

from ctnocvr_rec.data.batching import table_to_batch
from ctnocvr_rec.data.prepared import FORMAT, PreparedSet, read_manifest, write_manifest
from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.data.shards import SCALAR_COLUMNS, FieldValues, shard_table, write_shard
from ctnocvr_rec.data.vocab import FieldVocab


@pytest.fixture
def prepared(tmp_path):
    write_prepared(tmp_path, aliccp_schema(), {"train": 120, "test": 30}, rows_per_file=50, row_group_size=16)
    return tmp_path


def test_handle_reads_manifest_schema_sizes_splits_once(prepared):
    ps = PreparedSet.open(prepared)
    assert ps.manifest == read_manifest(prepared) and ps.manifest["format"] == FORMAT
    assert ps.schema.names == aliccp_schema().names and ps.schema.source.endswith("manifest.json:schema")
    assert ps.num_embeddings == fixture_num_embeddings(aliccp_schema()) == ps.table_sizes()
    assert ps.splits == ["train", "test"] and ps.has_split("test") and not ps.has_split("valid")
    assert (ps.rows("train"), ps.rows("test"), ps.rows("valid")) == (120, 30, 0)
    assert [f.rsplit("/", 1)[1] for f in ps.files("train")] == ["part-00000.parquet", "part-00001.parquet",
                                                                "part-00002.parquet"]
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in ps.files("train")) == 120
    assert ps.fingerprint is None  # hand-written: no inputs to fingerprint
    with pytest.raises(FileNotFoundError, match="no Parquet files in .*valid"):
        ps.files("valid")
    assert PreparedSet.exists(prepared) and not PreparedSet.exists(prepared / "train")


def test_a_given_schema_selects_fields_and_is_checked(prepared, tmp_path):
    full = aliccp_schema()
    subset = FieldSchema(full.fields[:3], source="subset.yaml")
    assert PreparedSet.open(prepared, subset).schema.names == full.names[:3]
    assert PreparedSet.open(prepared, "aliccp").schema == full  # packaged name, same specs
    other = FieldSchema((dataclasses.replace(full.fields[0], min_count=5),), source="other.yaml")
    with pytest.raises(ValueError, match=r"other.yaml: field '101' differs from the prepared set's"):
        PreparedSet.open(prepared, other)
    alien = FieldSchema((dataclasses.replace(full.fields[0], name="999"),), source="alien.yaml")
    with pytest.raises(ValueError, match=r"alien.yaml: field '999' is not in the prepared set's schema"):
        PreparedSet.open(prepared, alien)


def test_manifest_without_schema_or_sizes(tmp_path):
    write_manifest(tmp_path, {"num_embeddings": {"101": 3}})
    with pytest.raises(ValueError, match="manifest holds no schema"):
        PreparedSet.open(tmp_path)
    one = FieldSchema(aliccp_schema().fields[:1], source="one.yaml")
    assert PreparedSet.open(tmp_path, one).table_sizes() == {"101": 3}  # older manifests: caller's schema
    two = FieldSchema(aliccp_schema().fields[:2], source="two.yaml")
    with pytest.raises(ValueError, match=r"manifest.json: num_embeddings lacks field\(s\) \['121'\]"):
        PreparedSet.open(tmp_path, two).table_sizes()
    (tmp_path / "manifest.json").write_text(json.dumps({"num_embeddings": {"101": "x"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="'num_embeddings' values must be integers"):
        PreparedSet.open(tmp_path, one)


def test_vocab_of_a_field(prepared):
    spec = aliccp_schema()["205"]
    vocab = FieldVocab.build(spec, np.array([7, 9, 11], np.int64), np.array([3, 1, 2], np.int64))
    (prepared / "vocab").mkdir()
    vocab.save(prepared / "vocab")
    loaded = PreparedSet.open(prepared).vocab("205")
    assert loaded.num_embeddings == vocab.num_embeddings
    assert loaded.map(np.array([9, 12])).tolist() == vocab.map(np.array([9, 12])).tolist()


def test_shard_layout(tmp_path):
    schema = FieldSchema(aliccp_schema().fields[:1] + (aliccp_schema()["853"],), source="two fields")
    assert schema.fields[1].weighted
    scalars = {"sample_id": [1, 2], "request_id": [5, 5], "user_id": [-1, 3], "click": [1, 0], "conversion": [1, 0]}
    fields = {"101": FieldValues(np.array([0, 1, 1]), np.array([4])),
              "853": FieldValues(np.array([0, 2, 3]), np.array([1, 2, 3]), np.array([0.5, 1.0, 2.0]))}
    table = shard_table(scalars, fields, schema, {"101": 10, "853": 2**31 + 5})
    assert table.column_names == [*SCALAR_COLUMNS, "101", "853", "853__w"]
    assert table.schema.field("click").type == pa.int8() and table.schema.field("user_id").type == pa.int64()
    assert table.schema.field("101").type == pa.list_(pa.field("element", pa.int32(), nullable=False))
    assert table.schema.field("853").type.value_type == pa.int64()  # a table of more than 2^31 rows
    assert not any(f.nullable for f in table.schema)
    write_shard(table, tmp_path / "s.parquet")
    back = pq.read_table(tmp_path / "s.parquet")
    assert back.equals(table) and back.column("101").to_pylist() == [[4], []]
    # the loader's KJTs carry the ids as stored: int32 for the small table, int64 for the huge one
    batch = table_to_batch(back, schema)
    assert batch.sparse_features.values().dtype == torch.int32 and batch.sparse_features.values().tolist() == [4]
    assert batch.weighted_features.values().dtype == torch.int64
    assert batch.weighted_features.values().tolist() == [1, 2, 3]
    meta = pq.ParquetFile(tmp_path / "s.parquet").metadata.row_group(0)
    dictionary = {meta.column(i).path_in_schema.split(".")[0]: "RLE_DICTIONARY" in meta.column(i).encodings
                  for i in range(meta.num_columns)}
    assert dictionary["sample_id"] and not dictionary["101"] and meta.column(0).compression == "LZ4"
    with pytest.raises(ValueError, match="field 853 is weighted but has no weights"):
        shard_table(scalars, {**fields, "853": FieldValues(np.array([0, 2, 3]), np.array([1, 2, 3]))}, schema,
                    {"101": 10, "853": 5})
    with pytest.raises(ValueError, match=r"missing column\(s\) \['conversion'\]"):
        shard_table({k: v for k, v in scalars.items() if k != "conversion"}, fields, schema, {"101": 10, "853": 5})


def test_ids_per_row_from_footers_equals_decoded_list_lengths(prepared):
    """The planner's pooling factors: footers only, yet equal to the decoded mean list length (an
    empty list counted as one id); a split without shards gives none."""
    ps = PreparedSet.open(prepared)
    got = ps.ids_per_row("train")
    table = pa.concat_tables(pq.read_table(f) for f in ps.files("train"))
    assert set(got) == set(ps.schema.names)
    for name in ps.schema.names:
        lengths = np.asarray(pa.compute.list_value_length(table.column(name)).to_numpy(zero_copy_only=False))
        assert got[name] == pytest.approx(np.maximum(lengths, 1).mean()), name
    multi = [s.name for s in ps.schema if s.multi_valued]
    assert max(got[n] for n in multi) > 1.5  # the fixture's histories really are longer than one id
    assert ps.ids_per_row("valid") == {}


def test_planner_sizes_carry_the_train_ids_per_row_per_table(prepared):
    """What `plan --prepared` hands the planner (the trainer calls the same two functions)."""
    from ctnocvr_rec.plan.api import pooling_by_table
    from ctnocvr_rec.plan.tables import load_manifest_sizes

    ps = PreparedSet.open(prepared)
    sizes = load_manifest_sizes(ps)
    assert sizes.pooling_factors == ps.ids_per_row("train")
    by_table = pooling_by_table(ps.schema, sizes.pooling_factors)
    assert by_table["t_109_14"] == [pytest.approx(ps.ids_per_row()["109_14"])]
