"""Elastic resume, the pure parts: splitting the rest of an epoch over other ranks, the loader
reading origin batches, plan layouts and the row-wise momentum rule (eq. R1 of train/reshard.py)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from _prepared_fixture import aliccp_schema, write_prepared

from ctnocvr_rec.data.dataset import ParquetBatchDataset, canonical_order, make_dataloader
from ctnocvr_rec.data.epoch_plan import compress, expand, nothing_trained, split_remaining, untrained
from ctnocvr_rec.train.reshard import TableLayout, plan_layouts, remap_rowwise_momentum, same_layout

ROWS = 203


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    write_prepared(root, aliccp_schema(), {"train": ROWS}, rows_per_file=70, row_group_size=16)
    return root


# ---------------------------------------------------------------- epoch plans (pure)


def test_expand_and_compress_are_inverse():
    plan = [[2, 0, 3, 5], [2, 1, 0, 2], [2, 1, 4, 5]]
    assert expand(plan) == [(2, 0, 3), (2, 0, 4), (2, 1, 0), (2, 1, 1), (2, 1, 4)]
    assert compress(expand(plan)) == plan


def test_untrained_follows_the_canonical_order_of_the_workers():
    # 7 batches read by 2 workers: order 0,4,1,5,2,6,3; after 3 batches {0, 4, 1} are done
    assert canonical_order(7, 2).tolist()[:3] == [0, 4, 1]
    left = untrained({"epoch": 0, "batches_yielded": 3, "num_workers": 2}, 2, 1, 7)
    assert left == [(2, 1, j) for j in (2, 3, 5, 6)]
    assert untrained(None, 2, 1, 3) == [(2, 1, 0), (2, 1, 1), (2, 1, 2)]


def test_split_remaining_reads_nothing_twice_and_drops_fewer_than_the_new_world():
    states = [{"epoch": 1, "batches_yielded": 3, "num_workers": 1},
              {"epoch": 1, "batches_yielded": 2, "num_workers": 1},
              {"epoch": 1, "batches_yielded": 4, "num_workers": 1}]
    split = split_remaining(states, 3, 5, 2)  # left: 2 + 3 + 1 = 6 batches -> 3 each
    assert split.batches_left == 6 and split.batches_per_rank == 3 and split.dropped == []
    got = [o for plan in split.plans for o in expand(plan)]
    want = [(3, 0, 3), (3, 0, 4), (3, 1, 2), (3, 1, 3), (3, 1, 4), (3, 2, 4)]
    assert got == want
    odd = split_remaining(states, 3, 5, 4)  # 6 over 4 ranks: 1 each, 2 dropped
    assert odd.batches_per_rank == 1 and len(odd.dropped) == 2
    assert sorted([o for p in odd.plans for o in expand(p)] + odd.dropped) == sorted(want)


def test_nested_split_continues_from_the_plan_of_the_previous_resume():
    first = split_remaining([{"epoch": 0, "batches_yielded": 1, "num_workers": 1}] * 2, 2, 4, 3)
    assert first.batches_per_rank == 2  # 3 + 3 left over 3 ranks
    states = [{"epoch": 0, "batches_yielded": 1, "num_workers": 1, "plan": p} for p in first.plans]
    second = split_remaining(states, 3, 4, 1)
    remaining = [o for p in first.plans for o in expand(p)[1:]]
    assert [o for p in second.plans for o in expand(p)] == remaining


def test_nothing_trained():
    assert nothing_trained([None, {"epoch": 0, "batches_yielded": 0, "num_workers": 1}])
    assert not nothing_trained([None, {"epoch": 0, "batches_yielded": 1, "num_workers": 1}])
    assert not nothing_trained([{"epoch": 0, "batches_yielded": 0, "num_workers": 1, "plan": []}])


def test_split_needs_one_state_per_old_rank():
    with pytest.raises(ValueError, match="2 old rank"):
        split_remaining([None], 2, 3, 1)


# ---------------------------------------------------------------- the loader reads origin batches


def _batches(ds, n=None):
    """Sample ids of the next ``n`` batches (all when None), taking no batch beyond them."""
    return [batch.sample_id.tolist() for batch in itertools.islice(ds, n)]


@pytest.mark.parametrize("window", [0, 2])
def test_a_plan_reads_exactly_the_origin_batches(prepared, window):
    """Rank r' of a plan reads the same rows (same window permutation) as the origin rank did."""
    kw = dict(batch_size=10, shuffle=True, seed=3, shuffle_window_batches=window, drop_remainder=True)
    origin = {r: _batches(ParquetBatchDataset(prepared, "train", rank=r, world_size=3, **kw)) for r in range(3)}
    ds = ParquetBatchDataset(prepared, "train", rank=0, world_size=1, **kw)
    plan = [[3, 2, 4, 6], [3, 0, 1, 3]]
    ds.load_state_dict({"epoch": 0, "batches_yielded": 0, "num_workers": 1, "plan": plan})
    assert len(ds) == 4
    assert _batches(ds) == [origin[2][4], origin[2][5], origin[0][1], origin[0][2]]


def test_epoch_rest_over_other_world_sizes_keeps_every_row_once(prepared):
    """2 ranks train 3 and 4 batches, then the rest runs on 1 and on 3 ranks: the union of what was
    read equals the 2-rank epoch (minus the reported dropped batches), nothing twice."""
    kw = dict(batch_size=10, shuffle=True, seed=1, shuffle_window_batches=2, drop_remainder=True)
    old = [make_dataloader(prepared, "train", rank=r, world_size=2, **kw) for r in range(2)]
    full = [set(i for b in _batches(d) for i in b) for d in old]
    read: list[int] = []
    states = []
    for d, n in zip(old, (3, 4)):
        d.set_epoch(0)
        read += [i for b in _batches(d, n) for i in b]
        states.append(d.state_dict())
    for new_world in (1, 3):
        split = split_remaining(states, 2, len(old[0]), new_world)
        rest = []
        for r, plan in enumerate(split.plans):
            d = make_dataloader(prepared, "train", rank=r, world_size=new_world, **kw)
            d.set_epoch(0)
            d.load_state_dict({"epoch": 0, "batches_yielded": 0, "num_workers": 1, "plan": plan})
            rest += [i for b in _batches(d) for i in b]
        total = read + rest
        assert len(total) == len(set(total))  # nothing twice
        assert len(split.dropped) < new_world
        assert set(total) | {i for w, r, j in split.dropped for i in _batches(
            ParquetBatchDataset(prepared, "train", rank=r, world_size=w, **kw))[j]} == full[0] | full[1]


def test_a_plan_survives_a_save_and_resume_inside_the_resumed_epoch(prepared):
    kw = dict(batch_size=10, shuffle=True, seed=2, drop_remainder=True)
    plan = [[2, 1, 2, 7], [2, 0, 5, 9]]
    a = make_dataloader(prepared, "train", **kw)
    a.set_epoch(0)
    a.load_state_dict({"epoch": 0, "batches_yielded": 0, "num_workers": 1, "plan": plan})
    whole = _batches(a)
    b = make_dataloader(prepared, "train", **kw)
    b.set_epoch(0)
    b.load_state_dict({"epoch": 0, "batches_yielded": 0, "num_workers": 1, "plan": plan})
    head = _batches(b, 4)
    state = b.state_dict()
    assert state["plan"] == plan and state["batches_yielded"] == 4
    c = make_dataloader(prepared, "train", **kw)
    c.set_epoch(0)
    c.load_state_dict(state)
    assert head + _batches(c) == whole
    c.set_epoch(1)  # a new epoch drops the plan
    assert "plan" not in c.state_dict() and len(c) == ROWS // 10


# ---------------------------------------------------------------- plan layouts and momentum rule


def _plan(**tables):
    modules = {"sparse_arch.embedding_bag_collection": {
        name: {"sharding_type": st, "compute_kernel": "fused", "ranks": list(range(len(cols))),
               "shards": [{"offsets": [0, a], "sizes": [40, b - a], "placement": f"rank:{i}/cpu"}
                          for i, (a, b) in enumerate(cols)]}
        for name, (st, cols) in tables.items()}}
    return json.dumps({"format": 1, "meta": {}, "modules": modules})


def test_plan_layouts_sort_column_shards_and_same_layout_compares_modules():
    text = _plan(t_1=("column_wise", [(4, 8), (0, 4)]), t_2=("table_wise", [(0, 8)]))
    layouts = plan_layouts(text)
    assert layouts["sparse_arch.embedding_bag_collection.t_1"] == TableLayout("column_wise", "fused",
                                                                              ((0, 4), (4, 8)), (0, 1))
    assert same_layout({"world_size": 2, "plan": text}, 2, text)
    assert not same_layout({"world_size": 2, "plan": text}, 1, text)
    other = _plan(t_1=("table_wise", [(0, 8)]), t_2=("table_wise", [(0, 8)]))
    assert not same_layout({"world_size": 2, "plan": text}, 2, other)


def test_rowwise_momentum_merge_is_the_width_weighted_mean():
    rows = 3
    m0, m1, m2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 0.0, 1.0]), torch.tensor([2.0, 2.0, 2.0])
    saved = torch.cat([m0, m1, m2])
    cols = ((0, 4), (4, 12), (12, 16))  # widths 4, 8, 4
    merged, exact = remap_rowwise_momentum(saved, rows, cols, ((0, 16),))
    assert exact and torch.allclose(merged, (4 * m0 + 8 * m1 + 4 * m2) / 16)
    pair, exact = remap_rowwise_momentum(saved, rows, cols, ((0, 12), (12, 16)))
    assert exact and torch.allclose(pair, torch.cat([(4 * m0 + 8 * m1) / 12, m2]))
    same, exact = remap_rowwise_momentum(saved, rows, cols, cols)
    assert exact and torch.equal(same, saved)


def test_rowwise_momentum_split_copies_the_group_mean_and_says_so():
    m = torch.tensor([1.0, 4.0])
    split, exact = remap_rowwise_momentum(m, 2, ((0, 8),), ((0, 4), (4, 8)))
    assert not exact and torch.equal(split, torch.cat([m, m]))
    with pytest.raises(ValueError, match="does not match 2 rows x 2 column shard"):
        remap_rowwise_momentum(torch.zeros(3), 2, ((0, 4), (4, 8)), ((0, 8),))


def test_a_position_saved_after_the_last_batch_of_an_epoch_leaves_nothing_of_it(tmp_path):
    """A checkpoint saved right after an epoch's last batch (before the loop moves to the next epoch)
    must not make a resume train that epoch again."""
    from ctnocvr_rec.config import load_config
    from ctnocvr_rec.train.data_source import TrainData
    from ctnocvr_rec.train.distributed import DistContext
    from ctnocvr_rec.train.testing import write_tiny_prepared

    root = write_tiny_prepared(tmp_path / "p", {"train": 500, "valid": 10, "test": 10}, rows_per_file=250)
    cfg = load_config(None, [f"data.prepared_dir={root}", "data.batch_size=100", "train.device=cpu"])
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"), "gloo", None, False)
    data = TrainData(cfg, ctx)
    batches = data.epoch_batches(0)
    assert len(list(itertools.islice(batches, 5))) == 5
    end = data.state_dict()
    assert end["batches_yielded"] == 5
    assert list(TrainData(cfg, ctx).epoch_batches(0, end)) == []
    middle = {**end, "batches_yielded": 3}
    assert len(list(TrainData(cfg, ctx).epoch_batches(0, middle))) == 2
