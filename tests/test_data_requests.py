"""Per-request fields (``ctnocvr_rec/data/requests.py``): user fields stored once per request and
joined by ``request_id`` give exactly the batches, stats and planner inputs of the per-row layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ctnocvr_rec.data import synth
from ctnocvr_rec.data.dataset import make_dataloader
from ctnocvr_rec.data.prepare import PrepareOptions, prepare
from ctnocvr_rec.data.prepared import PreparedSet
from ctnocvr_rec.data.requests import RequestStore
from ctnocvr_rec.data.stats import compute_stats
from ctnocvr_rec.train.testing import write_tiny_prepared


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same synthetic raw files prepared in both layouts (small shards: several per split)."""
    root = tmp_path_factory.mktemp("layouts")
    synth.generate(synth.SynthConfig(rows_train=6000, rows_test=1500, users=200, items=150, seed=4), root / "raw")
    out = {}
    for layout in ("per-row", "per-request"):
        out[layout] = root / layout
        prepare(PrepareOptions(str(root / "raw"), str(out[layout]), rows_per_shard=1500, workers=2,
                               progress=False, user_features=layout))
    return out


def assert_same_batch(a, b) -> None:  # noqa: ANN001
    for name in ("click", "conversion", "sample_id", "request_id", "user_id"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for x, y in ((a.sparse_features, b.sparse_features), (a.weighted_features, b.weighted_features)):
        assert x.keys() == y.keys()
        assert torch.equal(x.lengths(), y.lengths()) and torch.equal(x.values(), y.values())
        assert (x.weights_or_none() is None) == (y.weights_or_none() is None)
        if x.weights_or_none() is not None:
            assert torch.equal(x.weights(), y.weights())


def test_shards_hold_no_user_field_and_the_requests_are_written_once(layouts):
    rows, reqs = PreparedSet.open(layouts["per-row"]), PreparedSet.open(layouts["per-request"])
    user = [s.name for s in reqs.schema if s.is_user]
    assert reqs.per_request_fields == tuple(user) and rows.per_request_fields == ()
    shard_columns = set(pq.read_schema(reqs.files("train")[0]).names)
    assert not shard_columns & {c for n in user for c in (n, f"{n}__w")}
    entry = reqs.manifest["per_request"]
    assert [f["file"] for f in entry["files"]] == ["requests/train.arrow", "requests/test.arrow"]
    assert entry["files"][1]["first_request_id"] == entry["files"][0]["requests"]  # dense, test after train
    size = lambda root: sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())  # noqa: E731
    assert size(layouts["per-request"]) < size(layouts["per-row"])
    # same vocabularies and table sizes: the user-field counts are impressions in both layouts
    assert reqs.num_embeddings == rows.num_embeddings
    for name in user:
        assert reqs.vocab(name).raw_ids.tolist() == rows.vocab(name).raw_ids.tolist()
        assert reqs.vocab(name).counts.tolist() == rows.vocab(name).counts.tolist()


@pytest.mark.parametrize("kw", [
    dict(shuffle=True, seed=3),
    dict(shuffle=False),
    dict(shuffle=True, seed=5, num_workers=2, world_size=2, rank=1, drop_remainder=True),
])
def test_every_batch_equals_the_per_row_layouts(layouts, kw):
    for split in ("train", "valid", "test"):
        a = list(make_dataloader(layouts["per-row"], split, 256, **kw))
        b = list(make_dataloader(layouts["per-request"], split, 256, **kw))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert_same_batch(x, y)


def test_resume_mid_epoch_continues_with_the_same_batches(layouts):
    kw = dict(shuffle=True, seed=7, num_workers=2)
    full = list(make_dataloader(layouts["per-row"], "train", 200, **kw))
    loader = make_dataloader(layouts["per-request"], "train", 200, **kw)
    for _, _ in zip(range(5), loader):
        pass
    resumed = make_dataloader(layouts["per-request"], "train", 200, **kw)
    resumed.load_state_dict(loader.state_dict())
    rest = list(resumed)
    assert len(rest) == len(full) - 5
    for x, y in zip(full[5:], rest):
        assert_same_batch(x, y)


def test_stats_planner_inputs_and_read_table_match(layouts):
    rows, reqs = PreparedSet.open(layouts["per-row"]), PreparedSet.open(layouts["per-request"])
    a, b = compute_stats(layouts["per-row"], ["train", "test"]), compute_stats(layouts["per-request"], ["train", "test"])
    a.pop("prepared_dir"), b.pop("prepared_dir")
    assert a == b
    # pooling factors: the footers count an empty list as one value, the manifest counts ids exactly
    got, footer = reqs.ids_per_row("train"), rows.ids_per_row("train")
    table = rows.read_table("train")
    for name in reqs.per_request_fields:
        exact = float(np.mean([len(v) for v in table.column(name).to_pylist()]))
        assert got[name] == pytest.approx(exact)
        assert footer[name] >= exact
    joined = reqs.read_table("train").sort_by("sample_id")
    assert joined.select(table.column_names).to_pydict() == table.sort_by("sample_id").to_pydict()


def test_a_request_table_that_does_not_match_the_shards_is_an_error(layouts, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(layouts["per-request"], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["per_request"]["files"][1]["first_request_id"] += 1  # test requests shifted by one
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"request_id \d+ is in no request table"):
        list(make_dataloader(broken, "test", 4096))
    manifest["per_request"]["files"][1]["requests"] += 5  # and more requests than the file holds
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="test.arrow: .* requests, the manifest says"):
        list(make_dataloader(broken, "test", 4096))


def test_rows_of_two_request_files_are_gathered_in_row_order(layouts):
    reqs = PreparedSet.open(layouts["per-request"])
    store: RequestStore = reqs.request_store()
    table = reqs.read_table("train")
    test = reqs.read_table("test")
    # interleave rows of train and test requests: one gather must keep each row's own list
    rid = np.stack([table.column("request_id").to_numpy()[:300], test.column("request_id").to_numpy()[:300]], 1)
    offsets, ids, weights = store.parts("150_14", rid.ravel())
    expect = [v for pair in zip(table.column("150_14").to_pylist()[:300], test.column("150_14").to_pylist()[:300])
              for v in pair]
    assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(600)] == expect
    expect_w = [v for pair in zip(table.column("150_14__w").to_pylist()[:300],
                                  test.column("150_14__w").to_pylist()[:300]) for v in pair]
    assert [weights[offsets[i]:offsets[i + 1]].tolist() for i in range(600)] == expect_w


def test_tiny_per_request_fixture_loads_like_its_per_row_twin(tmp_path):
    a = write_tiny_prepared(tmp_path / "rows", {"train": 700, "test": 300}, rows_per_file=300)
    b = write_tiny_prepared(tmp_path / "reqs", {"train": 700, "test": 300}, rows_per_file=300, per_request=True)
    assert PreparedSet.open(b).per_request_fields and not PreparedSet.open(a).per_request_fields
    for split in ("train", "test"):
        for x, y in zip(make_dataloader(a, split, 128, shuffle=True, seed=1),
                        make_dataloader(b, split, 128, shuffle=True, seed=1)):
            x.request_id.copy_(y.request_id)  # the only column that differs (own request per row)
            assert_same_batch(x, y)
