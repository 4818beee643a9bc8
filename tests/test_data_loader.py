"""ParquetBatchDataset: KJT contents, rank x worker sharding, resume, labels."""

from __future__ import annotations

import types
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _prepared_fixture import aliccp_schema, write_prepared

import ctnocvr_rec.data.batching as batching_mod
import ctnocvr_rec.data.dataset as dataset_mod
import ctnocvr_rec.data.units as units_mod
from ctnocvr_rec.data.batching import table_to_batch
from ctnocvr_rec.data.dataset import ParquetBatchDataset, canonical_order, make_dataloader
from ctnocvr_rec.labels import derive_ctnocvr_label

ROWS = 203  # not a multiple of any batch size / rank count used below: exercises the remainders


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    schema = aliccp_schema()
    tables = write_prepared(root, schema, {"train": ROWS, "test": 40}, rows_per_file=70, row_group_size=16)
    return root, schema, tables


def _sample_ids(batches) -> list[int]:
    return [int(x) for b in batches for x in b.sample_id.tolist()]


def _per_key(batch, schema) -> dict:
    """Every field's JaggedTensor from the batch's two KJTs, after checking the split contract:
    fields of weighted tables in ``weighted_features`` (with weights), the rest in the unweighted
    ``sparse_features`` (no weights array), schema order within each."""
    plain = batch.sparse_features
    assert plain.keys() == schema.unweighted_feature_names
    assert plain.weights_or_none() is None
    per_key = dict(plain.to_dict())
    if schema.weighted_feature_names:
        weighted = batch.weighted_features
        assert weighted.keys() == schema.weighted_feature_names and weighted.stride() == batch.batch_size
        assert weighted.weights().dtype == torch.float32
        per_key.update(weighted.to_dict())
    else:
        assert batch.weighted_features is None
    return per_key


def _weights(jt, spec) -> list[float]:
    """The weights the model sees for a field: the stored ones, 1.0 for plain fields."""
    w = jt.weights_or_none()
    return w.tolist() if w is not None else [1.0] * len(jt.values())


def test_derive_ctnocvr_label_truth_table():
    click = torch.tensor([0.0, 1.0, 1.0, 0.0])
    conversion = torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert derive_ctnocvr_label(click, conversion).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_kjt_equals_parquet_contents(prepared):
    root, schema, tables = prepared
    expected = tables["train"]
    ds = ParquetBatchDataset(root, "train", batch_size=32)
    batches = list(ds)
    assert [b.batch_size for b in batches] == [32] * 6 + [ROWS - 192]
    assert _sample_ids(batches) == expected.column("sample_id").to_pylist()
    row = 0
    for batch in batches:
        n = batch.batch_size
        part = expected.slice(row, n)
        assert batch.sparse_features.stride() == n
        per_key = _per_key(batch, schema)
        for spec in schema:
            jt = per_key[spec.feature_name]
            ids = part.column(spec.name).to_pylist()
            assert jt.lengths().tolist() == [len(x) for x in ids], spec.name
            assert jt.values().tolist() == [v for x in ids for v in x], spec.name
            if spec.weighted:
                want = np.array([w for x in part.column(spec.weight_column).to_pylist() for w in x], np.float32)
            else:
                want = np.ones(len(jt.values()), np.float32)
            np.testing.assert_array_equal(np.array(_weights(jt, spec), np.float32), want, err_msg=spec.name)
        click = np.array(part.column("click").to_pylist(), np.float32)
        conversion = np.array(part.column("conversion").to_pylist(), np.float32)
        np.testing.assert_array_equal(batch.click.numpy(), click)
        np.testing.assert_array_equal(batch.conversion.numpy(), conversion)
        np.testing.assert_array_equal(batch.ctnocvr.numpy(), ((click == 1) & (conversion == 0)).astype(np.float32))
        assert batch.user_id.tolist() == part.column("user_id").to_pylist()
        assert batch.request_id.tolist() == part.column("request_id").to_pylist()
        row += n
    assert row == ROWS


def test_shuffled_batches_carry_their_rows_contents(prepared):
    """The shuffle path gathers rows itself (not via Arrow): check every id and weight per row."""
    root, schema, tables = prepared
    by_sid = {row["sample_id"]: row for row in tables["train"].to_pylist()}
    ds = ParquetBatchDataset(root, "train", batch_size=24, shuffle=True, seed=9, shuffle_window_batches=3)
    seen = []
    for batch in ds:
        per_key = _per_key(batch, schema)
        for spec in schema:
            jt = per_key[spec.feature_name]
            rows = [by_sid[s] for s in batch.sample_id.tolist()]
            assert jt.lengths().tolist() == [len(r[spec.name]) for r in rows], spec.name
            assert jt.values().tolist() == [v for r in rows for v in r[spec.name]], spec.name
            want_w = [np.float32(w) for r in rows for w in r[spec.weight_column]] if spec.weighted else \
                [1.0] * len(jt.values())
            assert _weights(jt, spec) == want_w, spec.name
        rows = [by_sid[s] for s in batch.sample_id.tolist()]
        assert batch.click.tolist() == [r["click"] for r in rows]
        assert batch.conversion.tolist() == [r["conversion"] for r in rows]
        assert batch.user_id.tolist() == [r["user_id"] for r in rows]
        assert batch.request_id.tolist() == [r["request_id"] for r in rows]
        seen.extend(batch.sample_id.tolist())
    assert sorted(seen) == sorted(by_sid) and seen != sorted(seen)  # all rows, in a shuffled order


def _run_as(ds: ParquetBatchDataset, worker: int, workers: int, monkeypatch) -> list:
    """Iterate ``ds`` as DataLoader worker ``worker`` of ``workers`` would."""
    info = types.SimpleNamespace(id=worker, num_workers=workers)
    monkeypatch.setattr(dataset_mod, "get_worker_info", lambda: info if workers > 1 else None)
    return list(ds)


def _round_robin(streams: list[list]) -> list:
    """What a DataLoader yields from worker streams: one item from each live worker in turn."""
    out, i = [], 0
    while any(i < len(s) for s in streams):
        out.extend(s[i] for s in streams if i < len(s))
        i += 1
    return out


def test_canonical_order_interleaves_contiguous_blocks():
    assert canonical_order(7, 2).tolist() == [0, 4, 1, 5, 2, 6, 3]
    assert canonical_order(5, 1).tolist() == [0, 1, 2, 3, 4]
    for n in range(0, 12):
        for w in range(1, 5):
            order = canonical_order(n, w)
            assert sorted(order.tolist()) == list(range(n))
            # dealing the order round-robin gives each worker one contiguous block, and the
            # round-robin merge of the workers' streams gives the order back
            streams = [order[k::w].tolist() for k in range(w)]
            assert all(s == list(range(s[0], s[0] + len(s))) for s in streams if s)
            assert _round_robin(streams) == order.tolist()


def test_workers_decode_only_their_own_row_groups(prepared, monkeypatch):
    root, _, _ = prepared
    reads = []
    original = units_mod.RangeReader._unit_table

    def counting(self, k):
        if self._cached is None or self._cached[0] != k:
            reads.append(self.order[k])
        return original(self, k)

    monkeypatch.setattr(units_mod.RangeReader, "_unit_table", counting)
    ds = ParquetBatchDataset(root, "train", batch_size=8)
    for w in range(2):
        _run_as(ds, w, 2, monkeypatch)
    assert len(reads) <= len(ds.units) + 1  # only a row group split between the two blocks twice


def test_resume_with_another_worker_count(prepared, monkeypatch):
    root, _, _ = prepared
    ds = ParquetBatchDataset(root, "train", batch_size=9, shuffle=True, seed=4)
    order = canonical_order(len(ds), 2).tolist()
    ds.set_epoch(1)
    full = {tuple(b.sample_id.tolist()) for w in range(2) for b in _run_as(ds, w, 2, monkeypatch)}
    assert len(full) == len(ds)
    for new_workers in (1, 3):
        ds.load_state_dict({"epoch": 1, "batches_yielded": 5, "num_workers": 2})
        streams = [[tuple(b.sample_id.tolist()) for b in _run_as(ds, w, new_workers, monkeypatch)]
                   for w in range(new_workers)]
        resumed = _round_robin(streams)
        assert len(resumed) == len(order) - 5 and set(resumed) <= full
        # same batches as the rest of the interrupted pass's order (batch j of the rank's stream)
        ds_plain = ParquetBatchDataset(root, "train", batch_size=9, shuffle=True, seed=4)
        ds_plain.load_state_dict({"epoch": 1, "batches_yielded": 0, "num_workers": 1})
        in_stream_order = [tuple(b.sample_id.tolist()) for b in _run_as(ds_plain, 0, 1, monkeypatch)]
        assert resumed == [in_stream_order[j] for j in order[5:]]


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_exactly_once_over_ranks_and_workers(prepared, monkeypatch, shuffle):
    root, _, tables = prepared
    all_ids = Counter(tables["train"].column("sample_id").to_pylist())
    for world in (1, 2, 3):
        for workers in (1, 2, 3):
            seen: Counter = Counter()
            per_rank_batches = []
            for rank in range(world):
                ds = ParquetBatchDataset(root, "train", batch_size=10, rank=rank, world_size=world,
                                         shuffle=shuffle, seed=3, shuffle_window_batches=2)
                n = 0
                for w in range(workers):
                    batches = _run_as(ds, w, workers, monkeypatch)
                    n += len(batches)
                    seen.update(_sample_ids(batches))
                per_rank_batches.append(n)
                assert n == len(ds)
            assert seen == all_ids, (world, workers)  # every row once: none lost, none repeated
            assert max(per_rank_batches) - min(per_rank_batches) <= 1
            assert per_rank_batches == ParquetBatchDataset(
                root, "train", batch_size=10, world_size=world).batch_counts()


def test_drop_remainder_gives_equal_full_batches(prepared, monkeypatch):
    root, _, _ = prepared
    world, batch = 3, 16
    seen: Counter = Counter()
    counts = []
    for rank in range(world):
        ds = ParquetBatchDataset(root, "train", batch_size=batch, rank=rank, world_size=world,
                                 shuffle=True, drop_remainder=True)
        batches = _run_as(ds, 0, 1, monkeypatch)
        assert all(b.batch_size == batch for b in batches)
        counts.append(len(batches))
        seen.update(_sample_ids(batches))
    assert counts == [ROWS // (world * batch)] * world == ds.batch_counts()
    assert max(seen.values()) == 1 and sum(seen.values()) == world * batch * (ROWS // (world * batch))


def test_epoch_shuffle_is_seeded(prepared):
    root, _, _ = prepared
    ds = ParquetBatchDataset(root, "train", batch_size=20, shuffle=True, seed=5)
    ds.set_epoch(0)
    first = _sample_ids(ds)
    ds.set_epoch(0)
    again = _sample_ids(ds)
    ds.set_epoch(1)
    other = _sample_ids(ds)
    assert first == again
    assert first != other and sorted(first) == sorted(other)


def test_resume_continues_at_the_same_batch(prepared):
    root, _, _ = prepared
    loader = make_dataloader(root, "train", batch_size=16, shuffle=True, seed=1)
    loader.set_epoch(2)
    full = [b.sample_id.tolist() for b in loader]
    it = iter(loader)
    head = [next(it).sample_id.tolist() for _ in range(5)]
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches_yielded": 5, "num_workers": 1}
    resumed = make_dataloader(root, "train", batch_size=16, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    tail = [b.sample_id.tolist() for b in resumed]
    assert head + tail == full
    assert resumed.state_dict() == {"epoch": 2, "batches_yielded": len(full), "num_workers": 1}


@pytest.mark.slow
def test_real_dataloader_workers_keep_order_and_resume(prepared):
    torch.set_num_threads(1)
    root, _, tables = prepared
    single = [b.sample_id.tolist() for b in make_dataloader(root, "train", batch_size=12, shuffle=True, seed=2)]
    loader = make_dataloader(root, "train", batch_size=12, shuffle=True, seed=2, num_workers=2)
    two = [b.sample_id.tolist() for b in loader]
    # the loader alternates between the workers' contiguous blocks: the canonical order
    assert two == [single[j] for j in canonical_order(len(single), 2)]
    assert sorted(x for b in two for x in b) == sorted(tables["train"].column("sample_id").to_pylist())
    it = iter(loader)
    head = [next(it).sample_id.tolist() for _ in range(3)]  # odd count: resumed workers swap roles
    del it
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches_yielded": 3, "num_workers": 2}
    resumed = make_dataloader(root, "train", batch_size=12, shuffle=True, seed=2, num_workers=2)
    resumed.load_state_dict(state)
    assert head + [b.sample_id.tolist() for b in resumed] == two


def test_invalid_label_pair_names_the_file(tmp_path):
    schema = aliccp_schema()
    write_prepared(tmp_path, schema, {"train": 30}, rows_per_file=30)
    path = tmp_path / "train" / "part-00000.parquet"
    table = pq.read_table(path)
    click = np.array(table.column("click").to_pylist(), np.int8)
    click[7], conversion = 0, np.array(table.column("conversion").to_pylist(), np.int8)
    conversion[7] = 1
    table = table.set_column(table.schema.get_field_index("click"), "click", pa.array(click))
    table = table.set_column(table.schema.get_field_index("conversion"), "conversion", pa.array(conversion))
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"part-00000.parquet row group 0: 1 row\(s\) with conversion=1 and "
                       r"click=0 .* first at row 7 of the group \(sample_id 8\)"):
        list(ParquetBatchDataset(tmp_path, "train", batch_size=8))


def test_missing_column_names_file_and_column(tmp_path):
    schema = aliccp_schema()
    write_prepared(tmp_path, schema, {"train": 20}, rows_per_file=20)
    path = tmp_path / "train" / "part-00000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["853__w"]), path)
    with pytest.raises(ValueError, match=r"part-00000.parquet: missing column\(s\) \['853__w'\]"):
        ParquetBatchDataset(tmp_path, "train", batch_size=8)


def test_table_to_batch_handles_sliced_chunked_columns(prepared):
    _, schema, tables = prepared
    table = tables["test"]
    chunked = pa.concat_tables([table.slice(3, 10), table.slice(20, 7)])  # two chunks, both sliced
    batch = table_to_batch(chunked, schema)
    spec = schema["210"]
    want = table.slice(3, 10).column("210").to_pylist() + table.slice(20, 7).column("210").to_pylist()
    jt = _per_key(batch, schema)[spec.feature_name]
    assert jt.lengths().tolist() == [len(x) for x in want]
    assert jt.values().tolist() == [v for x in want for v in x]


def _raw_rows(raw_dir, split: str) -> dict[int, dict]:
    """Plain-Python read of a raw split: sample_id -> labels, key and per-field (raw id, value) lists."""
    common = {}
    for line in (raw_dir / f"common_features_{split}.csv").read_text(encoding="ascii").splitlines():
        key, _, flist = line.split(",")
        common[key] = [tuple(item.replace("\x03", "\x02").split("\x02")) for item in flist.split("\x01")]
    rows = {}
    for line in (raw_dir / f"sample_skeleton_{split}.csv").read_text(encoding="ascii").splitlines():
        sid, click, buy, key, _, flist = line.split(",")
        fields: dict[str, list] = {}
        for name, fid, value in [tuple(i.replace("\x03", "\x02").split("\x02")) for i in flist.split("\x01")] + common[key]:
            fields.setdefault(name, []).append((int(fid), float(value)))
        rows[int(sid)] = {"click": int(click), "buy": int(buy), "key": key, "fields": fields}
    return rows


@pytest.mark.slow
def test_round_trip_synth_prepare_load_keeps_every_row_and_value(tmp_path):
    """synth -> prepare -> loader: every raw row comes back once, with every id, weight and label."""
    import ctnocvr_rec.data.prepare as prepare_mod
    from ctnocvr_rec.data.synth import SynthConfig, generate

    raw, out = tmp_path / "raw", tmp_path / "prepared"
    generate(SynthConfig(rows_train=1500, rows_test=400, users=120, items=90, seed=5), raw)
    prepare_mod.prepare(prepare_mod.PrepareOptions(
        raw_dir=str(raw), out_dir=str(out), workers=1, progress=False, rows_per_shard=700))
    schema = aliccp_schema()
    expected = {**_raw_rows(raw, "train"), **_raw_rows(raw, "test")}
    vocab = {}
    for spec in schema:
        v = pq.read_table(out / "vocab" / f"{spec.name}.parquet").to_pydict()
        vocab[spec.name] = dict(zip(v["raw_id"], v["mapped_id"]))
    seen = set()
    request_of_key: dict[str, int] = {}
    # prepare stores int32 ids; the loader hands the KJT int32 ids (the kernels' id dtype,
    # plan.sharding.id_dtype), int32 lengths, float32 weights
    assert pq.read_schema(next((out / "train").glob("*.parquet"))).field("205").type.value_type == pa.int32()
    for split in ("train", "valid", "test"):
        for batch in ParquetBatchDataset(out, split, batch_size=128, schema=schema, rank=0, world_size=1,
                                         shuffle=split == "train", shuffle_window_batches=2):
            for kjt in (batch.sparse_features, batch.weighted_features):
                assert (kjt.values().dtype, kjt.lengths().dtype) == (torch.int32, torch.int32)
            per_key = _per_key(batch, schema)
            lengths = {k: jt.lengths().tolist() for k, jt in per_key.items()}
            offsets = {k: np.concatenate([[0], np.cumsum(v)]) for k, v in lengths.items()}
            for r, sid in enumerate(batch.sample_id.tolist()):
                assert sid not in seen, f"sample {sid} loaded twice"
                seen.add(sid)
                want = expected[sid]
                assert batch.click[r] == want["click"] and batch.conversion[r] == want["buy"], sid
                assert batch.ctnocvr[r] == float(want["click"] == 1 and want["buy"] == 0)
                assert request_of_key.setdefault(want["key"], int(batch.request_id[r])) == int(batch.request_id[r])
                assert batch.user_id[r] == want["fields"]["101"][0][0]
                for spec in schema:
                    jt = per_key[spec.feature_name]
                    lo, hi = offsets[spec.feature_name][r], offsets[spec.feature_name][r + 1]
                    raw_items = want["fields"].get(spec.name, [])
                    assert jt.values()[lo:hi].tolist() == [vocab[spec.name].get(i, 0) for i, _ in raw_items], (sid, spec.name)
                    want_w = [np.float32(v) if spec.weighted else np.float32(1.0) for _, v in raw_items]
                    assert _weights(jt, spec)[lo:hi] == want_w, (sid, spec.name)
    assert seen == set(expected)  # every raw row once, none invented
    assert len(set(request_of_key.values())) == len(request_of_key)  # one request id per common key


def test_csr_gather_index_matches_a_row_by_row_gather():
    """The loader's window gather (``data/csr.py``): any row order, empty rows first and last, and the
    one-value-per-row shortcut."""
    from ctnocvr_rec.data.csr import csr_gather_index

    rng = np.random.default_rng(3)
    for n, max_len in ((1, 5), (7, 5), (300, 5), (50, 1), (50, 2)):
        row_lengths = rng.integers(0 if max_len > 1 else 1, max_len + 1, n)
        if max_len > 1:
            row_lengths[rng.random(n) < 0.3] = 0
        src_offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int32)
        order = rng.permutation(n)
        want = [i for r in order for i in range(src_offsets[r], src_offsets[r + 1])]
        offsets, got = csr_gather_index(src_offsets, order)
        assert got.tolist() == want and got.dtype == np.int32
        assert offsets.tolist() == np.concatenate([[0], np.cumsum(row_lengths[order])]).tolist()


def test_loader_splits_weighted_tables_including_a_shared_table_with_one_weighted_field(tmp_path):
    """``s_w`` is weighted and shares table ``t_s`` with plain ``s_p``: both go to the weighted KJT
    (``s_p`` with weight 1.0); ``c`` and ``m`` stay in the unweighted KJT, which has no weights."""
    from ctnocvr_rec.data.dataset import benchmark_loader
    from ctnocvr_rec.data.schema import FieldSchema

    schema = FieldSchema.from_dict({"fields": [
        {"name": "c", "group": "context"},
        {"name": "s_w", "group": "user", "weighted": True, "multi_valued": True, "table": "t_s"},
        {"name": "m", "group": "item", "multi_valued": True},
        {"name": "s_p", "group": "item", "table": "t_s"},
    ]})
    assert schema.weighted_feature_names == ["f_s_w", "f_s_p"]
    assert schema.unweighted_feature_names == ["f_c", "f_m"]
    table = write_prepared(tmp_path, schema, {"train": 90}, rows_per_file=40, row_group_size=16)["train"]
    by_sid = {row["sample_id"]: row for row in table.to_pylist()}
    for shuffle in (False, True):
        rows_seen = 0
        for batch in ParquetBatchDataset(tmp_path, "train", batch_size=32, shuffle=shuffle, seed=3):
            assert batch.sparse_features.keys() == ["f_c", "f_m"]
            assert batch.sparse_features.weights_or_none() is None
            assert batch.weighted_features.keys() == ["f_s_w", "f_s_p"]
            rows = [by_sid[s] for s in batch.sample_id.tolist()]
            plain = batch.sparse_features.to_dict()
            weighted = batch.weighted_features.to_dict()
            for name in ("c", "m"):
                assert plain[f"f_{name}"].values().tolist() == [v for r in rows for v in r[name]], name
            assert weighted["f_s_w"].values().tolist() == [v for r in rows for v in r["s_w"]]
            assert weighted["f_s_w"].weights().tolist() == [np.float32(w) for r in rows for w in r["s_w__w"]]
            assert weighted["f_s_p"].values().tolist() == [v for r in rows for v in r["s_p"]]
            assert weighted["f_s_p"].weights().tolist() == [1.0] * sum(len(r["s_p"]) for r in rows)
            rows_seen += batch.batch_size
        assert rows_seen == 90
    # the loader benchmark counts the ids of both KJTs
    total_ids = sum(len(r[f]) for r in by_sid.values() for f in ("c", "s_w", "m", "s_p"))
    stats = benchmark_loader(tmp_path, "train", batch_size=32, shuffle=False)
    assert stats["ids_per_row"] == pytest.approx(total_ids / 90)


def test_loader_gives_no_weighted_kjt_for_an_unweighted_schema(tmp_path):
    from ctnocvr_rec.data.schema import FieldSchema

    schema = FieldSchema.from_dict({"fields": [
        {"name": "a", "group": "user"}, {"name": "b", "group": "item", "multi_valued": True}]})
    write_prepared(tmp_path, schema, {"train": 20}, rows_per_file=20)
    batches = list(ParquetBatchDataset(tmp_path, "train", batch_size=8))
    assert [b.batch_size for b in batches] == [8, 8, 4]
    for batch in batches:
        assert batch.weighted_features is None
        assert batch.sparse_features.keys() == ["f_a", "f_b"] and batch.sparse_features.weights_or_none() is None


def test_read_ahead_is_capped_in_bytes(prepared, monkeypatch):
    """A slow consumer lets the read-ahead fill: it holds at most READ_AHEAD_BYTES of batches."""
    import time

    root, schema, _ = prepared
    plain = ParquetBatchDataset(root, "train", 8, schema=schema)
    assert plain.prefetch_batches == 8  # small batches: the count applies
    monkeypatch.setattr(dataset_mod, "READ_AHEAD_BYTES", 3 * plain.batch_bytes)
    capped = ParquetBatchDataset(root, "train", 8, schema=schema)
    assert capped.prefetch_batches == 3
    built = []
    original = batching_mod.BatchRows.batch

    def counting(self, lo, hi):  # noqa: ANN001, ANN202
        built.append(hi - lo)
        return original(self, lo, hi)

    monkeypatch.setattr(batching_mod.BatchRows, "batch", counting)
    ahead, rows = [], 0
    for i, batch in enumerate(capped):
        time.sleep(0.005)  # the consumer is slower than the loader
        ahead.append(len(built) - (i + 1))
        rows += batch.batch_size
    assert rows == ROWS and max(ahead) <= 3 and max(ahead) >= 2
