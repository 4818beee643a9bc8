"""Field embedding, expert extraction (MMoE/CGC/PLE) and towers."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.models.testing import random_features, random_kjt, split_features, tiny_schema
from ctnocvr_rec.modules import GROUP_ORDER, ExpertExtraction, FieldEmbedding, TaskTower, physical_dim

CPU = torch.device("cpu")


def _sizes(schema: FieldSchema) -> dict[str, int]:
    return {name: 7 + i for i, name in enumerate(schema.names)}


def _bags(emb: FieldEmbedding) -> dict[str, torch.nn.EmbeddingBag]:
    """Every table of both EBCs, by table name."""
    out: dict[str, torch.nn.EmbeddingBag] = {}
    for ebc in (emb.embedding_bag_collection, emb.weighted_embedding_bag_collection):
        if ebc is not None:
            out.update(ebc.embedding_bags)
    return out


# ------------------------------------------------------------------------------------------------
# FieldEmbedding
# ------------------------------------------------------------------------------------------------


def test_physical_dim_rounds_up_to_multiple_of_four():
    assert [physical_dim(d) for d in (1, 4, 12, 18, 24, 25)] == [4, 4, 12, 20, 24, 28]
    with pytest.raises(ValueError):
        physical_dim(0)


def test_field_embedding_equals_single_weighted_ebc_formulation():
    """Split EBCs == the pre-split formulation (one weighted KJT of every field, weight 1.0 for plain
    fields), computed by hand from the table weights: per field in group order, the weighted sum of
    the first `dim` columns of its table."""
    schema = tiny_schema()
    sizes = _sizes(schema)
    emb = FieldEmbedding(schema, sizes, embedding_dim=6, field_embedding_dims={"combo": 8}, device=CPU)
    # t_tag is weighted because u_tag is, so plain i_tag is served by the weighted EBC as well
    assert set(emb.weighted_embedding_bag_collection.embedding_bags) == {"t_u_hist", "t_tag"}
    assert set(emb.embedding_bag_collection.embedding_bags) == {"t_ctx", "t_user", "t_item", "t_combo"}
    assert not emb.embedding_bag_collection.is_weighted() and emb.weighted_embedding_bag_collection.is_weighted()
    gen = torch.Generator().manual_seed(1)
    combined = random_kjt(schema, sizes, batch_size=5, generator=gen)  # one weighted KJT, all fields
    plain, weighted = split_features(combined, schema)
    assert plain.weights_or_none() is None and weighted is not None
    assert plain.keys() == ["f_ctx", "f_user", "f_item", "f_combo"]
    assert weighted.keys() == ["f_u_hist", "f_u_tag", "f_i_tag"]
    x = emb(plain, weighted)

    bags = _bags(emb)
    per_key = combined.to_dict()
    expected_cols = []
    for group in GROUP_ORDER:
        for spec in schema.by_group(group):
            dim = 8 if spec.name == "combo" else 6
            table = bags[spec.table_name].weight
            assert table.shape[1] == physical_dim(dim)
            jt = per_key[spec.feature_name]
            rows = []
            for ids, w in zip(jt.to_dense(), jt.to_dense_weights()):
                rows.append((table[ids, :dim] * w[:, None]).sum(0) if len(ids) else torch.zeros(dim))
            expected_cols.append(torch.stack(rows))
    expected = torch.cat(expected_cols, dim=1)
    assert x.shape == (5, 6 * 6 + 8) == (5, emb.output_dim)
    torch.testing.assert_close(x, expected)

    # Groups: user (user, u_hist, u_tag), item (item, i_tag), combination (combo), context (ctx).
    assert [s.group for s in emb.slots] == ["user"] * 3 + ["item"] * 2 + ["combination", "context"]
    assert emb.group_dims == {"user": 18, "item": 12, "combination": 8, "context": 6}
    parts = emb.split_groups(x)
    assert {k: v.shape[1] for k, v in parts.items()} == emb.group_dims
    torch.testing.assert_close(torch.cat([parts[g] for g in GROUP_ORDER], dim=1), x)


def test_shared_table_is_one_table_with_the_larger_size():
    schema = tiny_schema()
    sizes = _sizes(schema)
    emb = FieldEmbedding(schema, sizes, embedding_dim=4, device=CPU)
    bags = _bags(emb)
    assert "t_tag" in bags and "t_u_tag" not in bags and "t_i_tag" not in bags
    assert bags["t_tag"].weight.shape == (max(sizes["u_tag"], sizes["i_tag"]), 4)
    assert emb.output_dim == 4 * len(schema)


def test_padding_columns_receive_no_gradient():
    schema = tiny_schema()
    sizes = _sizes(schema)
    emb = FieldEmbedding(schema, sizes, embedding_dim=18, device=CPU)
    plain, weighted = random_features(schema, sizes, batch_size=8, generator=torch.Generator().manual_seed(0))
    emb(plain, weighted).pow(2).sum().backward()
    for name, bag in _bags(emb).items():
        grad = bag.weight.grad
        assert grad is not None, name
        assert grad[:, 18:].abs().max() == 0, name
        assert grad[:, :18].abs().max() > 0, name


def test_field_embedding_defaults_to_meta_and_reports_bad_input():
    schema = tiny_schema()
    sizes = _sizes(schema)
    emb = FieldEmbedding(schema, sizes)
    assert all(p.is_meta for p in emb.parameters())
    with pytest.raises(ValueError, match="num_embeddings has no table size for field.*'combo'"):
        FieldEmbedding(schema, {k: v for k, v in sizes.items() if k != "combo"})
    with pytest.raises(ValueError, match="u_tag and i_tag share table 't_tag'"):
        FieldEmbedding(schema, sizes, field_embedding_dims={"i_tag": 12})
    with pytest.raises(ValueError, match="not in schema"):
        FieldEmbedding(schema, sizes, field_embedding_dims={"nope": 12})


def test_field_embedding_accepts_keys_in_any_order():
    schema = tiny_schema()
    sizes = _sizes(schema)
    emb = FieldEmbedding(schema, sizes, embedding_dim=6, device=CPU)
    plain, weighted = random_features(schema, sizes, batch_size=4, generator=torch.Generator().manual_seed(3))

    def reversed_keys(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        d = kjt.to_dict()
        return KeyedJaggedTensor.from_jt_dict({k: d[k] for k in reversed(kjt.keys())})

    torch.testing.assert_close(emb(reversed_keys(plain), reversed_keys(weighted)), emb(plain, weighted))


def test_unweighted_only_schema_has_no_weighted_ebc():
    schema = FieldSchema.from_dict(
        {"fields": [{"name": "a", "group": "user"}, {"name": "b", "group": "item", "multi_valued": True}]}
    )
    sizes = _sizes(schema)
    emb = FieldEmbedding(schema, sizes, embedding_dim=4, device=CPU)
    assert emb.weighted_embedding_bag_collection is None
    assert not any("weighted_embedding_bag_collection" in name for name, _ in emb.named_parameters())
    plain, weighted = random_features(schema, sizes, batch_size=6, generator=torch.Generator().manual_seed(4))
    assert weighted is None and plain.weights_or_none() is None
    x = emb(plain)
    bags = emb.embedding_bag_collection.embedding_bags
    per_key = plain.to_dict()
    a = bags["t_a"].weight[per_key["f_a"].values()]  # one id per row
    b_jt = per_key["f_b"]
    b = torch.stack([bags["t_b"].weight[ids].sum(0) for ids in b_jt.to_dense()])
    torch.testing.assert_close(x, torch.cat([a, b], dim=1))


def test_weighted_only_schema_has_no_unweighted_ebc_and_missing_weighted_kjt_is_named():
    schema = FieldSchema.from_dict(
        {"fields": [{"name": "a", "group": "user", "weighted": True}, {"name": "b", "group": "item", "weighted": True}]}
    )
    sizes = _sizes(schema)
    emb = FieldEmbedding(schema, sizes, embedding_dim=4, device=CPU)
    assert emb.embedding_bag_collection is None
    plain, weighted = random_features(schema, sizes, batch_size=3, generator=torch.Generator().manual_seed(5))
    assert plain.keys() == [] and plain.stride() == 3 and weighted.keys() == ["f_a", "f_b"]
    x = emb(plain, weighted)
    per_key = weighted.to_dict()
    expected = torch.cat(
        [_bags(emb)[f"t_{n}"].weight[per_key[f"f_{n}"].values()] * per_key[f"f_{n}"].weights()[:, None]
         for n in ("a", "b")], dim=1)
    torch.testing.assert_close(x, expected)
    with pytest.raises(ValueError, match=r"fields \['f_a', 'f_b'\] belong to weighted tables.*weighted_features is None"):
        emb(plain)


# ------------------------------------------------------------------------------------------------
# Expert extraction
# ------------------------------------------------------------------------------------------------


def _reference_level(level, x_tasks, x_shared):
    """Loop-over-experts reference of one ExtractionLevel (slow, obviously correct)."""
    t, mk = level.num_tasks, level.num_task_experts
    h1 = level.expert_hidden[0]
    expert_outs = []  # order: task 0 experts, task 1 experts, ..., shared experts
    for e in range(level.num_experts):
        if e < t * mk:
            task, j = divmod(e, mk)
            inp = x_tasks if level.shared_input else x_tasks[:, task]
            w = level.task_weight[task, :, j * h1 : (j + 1) * h1]
            b = level.task_bias[task, j * h1 : (j + 1) * h1]
        else:
            j = e - t * mk
            inp = x_shared
            w = level.shared_weight[:, j * h1 : (j + 1) * h1]
            b = level.shared_bias[j * h1 : (j + 1) * h1]
        h = torch.relu(inp @ w + b)
        for dw, db in zip(level.deep_weights, level.deep_biases):
            h = torch.relu(h @ dw[e] + db[e, 0])
        expert_outs.append(h)
    outs, gates = [], []
    for task in range(t):
        inp = x_tasks if level.shared_input else x_tasks[:, task]
        g = torch.softmax(inp @ level.gate_weight[task] + level.gate_bias[task], dim=-1)
        selected = expert_outs[task * mk : (task + 1) * mk] + expert_outs[t * mk :]
        outs.append(sum(g[:, [i]] * s for i, s in enumerate(selected)))
        gates.append(g)
    shared_out = None
    if level.shared_gate_weight is not None:
        sg = torch.softmax(x_shared @ level.shared_gate_weight + level.shared_gate_bias, dim=-1)
        shared_out = sum(sg[:, [i]] * s for i, s in enumerate(expert_outs))
    return torch.stack(outs, 1), torch.stack(gates, 1), shared_out


@pytest.mark.parametrize(
    "mk,ms,levels,hidden",
    [(0, 5, 1, [6]), (2, 3, 1, [6]), (2, 3, 2, [6, 4]), (1, 2, 3, [5])],
    ids=["mmoe", "cgc", "ple2-deep", "ple3"],
)
def test_extraction_matches_loop_reference_and_gates_sum_to_one(mk, ms, levels, hidden):
    torch.manual_seed(0)
    num_tasks, batch = 3, 7
    ext = ExpertExtraction(10, num_tasks, mk, ms, hidden, num_levels=levels)
    x = torch.randn(batch, 10)
    out, task_gates, shared_gates = ext.forward_with_gates(x)
    assert out.shape == (batch, num_tasks, hidden[-1])
    assert len(task_gates) == levels and len(shared_gates) == levels - 1
    for g in task_gates:
        assert g.shape == (batch, num_tasks, mk + ms)
        torch.testing.assert_close(g.sum(-1), torch.ones(batch, num_tasks))
        assert (g > 0).all()
    for g in shared_gates:
        assert g.shape == (batch, num_tasks * mk + ms)
        torch.testing.assert_close(g.sum(-1), torch.ones(batch))

    x_tasks, x_shared = x, x
    for i, level in enumerate(ext.levels):
        ref_out, ref_gates, ref_shared = _reference_level(level, x_tasks, x_shared)
        torch.testing.assert_close(ref_gates, task_gates[i])
        x_tasks = ref_out
        if ref_shared is not None:
            x_shared = ref_shared
    torch.testing.assert_close(out, x_tasks)


@pytest.mark.parametrize("mk,ms,levels", [(0, 4, 1), (2, 2, 2)], ids=["mmoe", "ple2"])
def test_padded_first_layer_compute_gives_the_same_values_and_gradients(mk, ms, levels):
    """The first level runs its GEMMs with the inner dim padded (414 -> 416 in the paper's model);
    outputs and every gradient must equal the unpadded computation."""
    torch.manual_seed(0)
    ext = ExpertExtraction(13, 3, mk, ms, [6, 5], num_levels=levels)
    assert ext.levels[0].compute_align == 16  # 13 -> 16: the padded path is the one under test
    x = torch.randn(9, 13, requires_grad=True)
    results = []
    for align in (16, 1):
        for level in ext.levels:
            level.compute_align = align
        ext.zero_grad()
        x.grad = None
        out = ext(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in ext.named_parameters()}
        results.append((out.detach(), x.grad.clone(), grads))
    (out_pad, gx_pad, g_pad), (out_ref, gx_ref, g_ref) = results
    torch.testing.assert_close(out_pad, out_ref)
    torch.testing.assert_close(gx_pad, gx_ref)
    assert g_pad.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_pad[name], g_ref[name], msg=name)


def test_cgc_task_output_ignores_other_tasks_experts():
    torch.manual_seed(0)
    cgc = ExpertExtraction(8, num_tasks=3, num_task_experts=2, num_shared_experts=2, expert_hidden=[4])
    out = cgc(torch.randn(16, 8))
    out[:, 1].sum().backward()
    level = cgc.levels[0]
    grad = level.task_weight.grad
    assert grad[1].abs().max() > 0  # its own experts
    assert grad[0].abs().max() == 0 and grad[2].abs().max() == 0  # the other tasks' experts
    assert level.shared_weight.grad.abs().max() > 0


def test_extraction_rejects_taskless_or_expertless_configs():
    with pytest.raises(ValueError, match="at least one expert"):
        ExpertExtraction(8, 2, 0, 0, [4])
    with pytest.raises(ValueError, match="num_levels"):
        ExpertExtraction(8, 2, 1, 1, [4], num_levels=0)


def test_extraction_initialises_from_meta_via_reset_parameters():
    ext = ExpertExtraction(8, 2, 1, 2, [4, 3], num_levels=2, device=torch.device("meta"))
    assert all(p.is_meta for p in ext.parameters())
    ext = ext.to_empty(device=CPU)
    for m in ext.modules():
        if hasattr(m, "reset_parameters") and m is not ext:
            m.reset_parameters()
    for name, p in ext.named_parameters():
        assert torch.isfinite(p).all() and p.abs().max() > 0, name
        assert p.abs().max() <= 1 / 3**0.5 + 1e-6, name  # bound 1/sqrt(fan_in), fan_in >= 3


def test_task_tower_returns_one_logit_per_row():
    tower = TaskTower(16, [300, 200, 80])
    assert tower(torch.randn(5, 16)).shape == (5,)
    assert sum(p.numel() for p in tower.parameters()) == 16 * 300 + 300 + 300 * 200 + 200 + 200 * 80 + 80 + 81


def test_field_embedding_selects_pooled_columns_by_key_not_position():
    # A sharded EBC returns its KeyedTensor in sharding-group order, not config order.
    from torchrec.sparse.jagged_tensor import KeyedTensor

    schema = tiny_schema()
    sizes = _sizes(schema)
    emb = FieldEmbedding(schema, sizes, embedding_dim=6, device=CPU)
    plain, weighted = random_features(schema, sizes, batch_size=4, generator=torch.Generator().manual_seed(2))
    expected = emb(plain, weighted)

    class ReversedKeys(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
            pooled = self.inner(features).to_dict()
            keys = list(reversed(list(pooled)))
            return KeyedTensor.from_tensor_list(keys, [pooled[k] for k in keys])

    emb.embedding_bag_collection = ReversedKeys(emb.embedding_bag_collection)
    emb.weighted_embedding_bag_collection = ReversedKeys(emb.weighted_embedding_bag_collection)
    torch.testing.assert_close(emb(plain, weighted), expected)


def test_both_ebcs_are_called_before_either_result_is_read():
    """Sharded EBCs return lazy awaitables whose output all-to-all runs until read; FieldEmbedding
    must start both before waiting on either, so one EBC's all-to-all overlaps the other's lookup."""
    schema = tiny_schema()
    sizes = _sizes(schema)
    emb = FieldEmbedding(schema, sizes, embedding_dim=6, device=CPU)
    plain, weighted = random_features(schema, sizes, batch_size=4, generator=torch.Generator().manual_seed(6))
    expected = emb(plain, weighted)
    events: list[str] = []

    class Lazy:  # stands in for TorchRec's LazyAwaitable[KeyedTensor]
        def __init__(self, name: str, kt) -> None:
            self.name, self.kt = name, kt

        def to_dict(self):
            events.append(f"wait {self.name}")
            return self.kt.to_dict()

    class Recording(torch.nn.Module):
        def __init__(self, name: str, ebc) -> None:
            super().__init__()
            self.name, self.ebc = name, ebc

        def forward(self, kjt):
            events.append(f"call {self.name}")
            return Lazy(self.name, self.ebc(kjt))

    emb.embedding_bag_collection = Recording("plain", emb.embedding_bag_collection)
    emb.weighted_embedding_bag_collection = Recording("weighted", emb.weighted_embedding_bag_collection)
    torch.testing.assert_close(emb(plain, weighted), expected)
    assert events[:2] == ["call weighted", "call plain"] and sorted(events[2:]) == ["wait plain", "wait weighted"]
