"""`ctnocvr plan` and the shared planner builder (ctnocvr_rec/plan/).

Plans are made on ``meta`` for simulated CUDA/CPU clusters: no process group, no GPU.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from ctnocvr_rec.config import OptimConfig, PlanConfig, RunConfig
from ctnocvr_rec.plan import api, render, saved, sharding, tables
from ctnocvr_rec.plan.report import PlanInfeasibleError, PlanReport

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "aliccp"  # the packaged field schema
GIB = 1 << 30


def run_config(**plan_fields) -> RunConfig:
    cfg = RunConfig()
    cfg.data.schema = SCHEMA
    for key, value in plan_fields.items():
        setattr(cfg.plan, key, value)
    return cfg


def small_manifest(tmp_path: Path, rows: int = 1000) -> Path:
    """A prepared-set manifest (no shards) with small tables (one row count per field, varied)."""
    from ctnocvr_rec.data.prepared import FORMAT, write_manifest
    from ctnocvr_rec.data.schema import load_schema

    schema = load_schema(SCHEMA)
    sizes = {spec.name: rows * (i + 1) for i, spec in enumerate(schema)}
    write_manifest(tmp_path, {"format": FORMAT, "schema": schema.to_dict(), "num_embeddings": sizes})
    return tmp_path


def check_plan_covers_tables(report: PlanReport, world_size: int) -> None:
    """Every shard on a real rank; shards tile each table exactly; per-rank sums match the shards."""
    assert report.tables, "no tables planned"
    for t in report.tables:
        assert all(0 <= s.rank < world_size for s in t.shards), t.name
        if t.sharding_type == "data_parallel":
            assert sorted(s.rank for s in t.shards) == list(range(world_size))
            assert all(s.sizes == [t.num_embeddings, t.embedding_dim] for s in t.shards)
            continue
        covered = sum(s.sizes[0] * s.sizes[1] for s in t.shards)
        assert covered == t.num_embeddings * t.embedding_dim, f"{t.name}: shards cover {covered} cells"
        for s in t.shards:
            assert (
                s.offsets[0] + s.sizes[0] <= t.num_embeddings and s.offsets[1] + s.sizes[1] <= t.embedding_dim
            )
    for r in report.ranks:
        shard_hbm = sum(s.hbm_bytes for t in report.tables for s in t.shards if s.rank == r.rank)
        shard_ddr = sum(s.ddr_bytes for t in report.tables for s in t.shards if s.rank == r.rank)
        assert r.sparse_hbm_bytes == shard_hbm
        assert r.used_ddr_bytes >= shard_ddr
        if r.hbm_capacity_bytes:
            # the planner's constraint: the shards fit in what the reservation leaves of each rank
            reserved = (
                report.meta["storage_reservation_percentage"]
                if report.meta["storage_reservation"] != "none"
                else 0
            )
            assert r.sparse_hbm_bytes <= r.hbm_capacity_bytes * (1 - reserved)
    assert len(report.ranks) == world_size
    assert report.imbalance["perf_max_over_mean"] >= 1.0


@pytest.mark.parametrize("world_size", [2, 8, 64])
def test_cuda_plans_for_2_8_64_ranks(world_size: int) -> None:
    cluster = api.Cluster(
        world_size=world_size, local_world_size=min(world_size, 8), device="cuda", hbm_gb=80
    )
    report = api.what_if_plan(run_config(), cluster, preset="aliccp-full")
    check_plan_covers_tables(report, world_size)
    assert report.meta["world_size"] == world_size
    shapes = {t.name: [t.num_embeddings, t.embedding_dim] for t in report.tables}
    preset = tables.load_preset("aliccp-full").num_embeddings
    # the item table has the preset's size, dim 18 served as 20 (multiple of 4)
    assert shapes["t_205"] == [preset["205"], 20]
    text = render.render_report(report, "table")
    assert "t_205" in text and f"{world_size} ranks" in text


def test_cpu_plan_for_2_ranks_uses_cpu_kernels_and_ddr(tmp_path: Path) -> None:
    cluster = api.Cluster(world_size=2, device="cpu", ddr_gb=4)
    report = api.what_if_plan(run_config(), cluster, prepared_dir=small_manifest(tmp_path))
    check_plan_covers_tables(report, 2)
    assert {t.sharding_type for t in report.tables} <= set(sharding.CPU_SHARDING_TYPES)
    assert {t.compute_kernel for t in report.tables} <= set(sharding.CPU_COMPUTE_KERNELS)
    # CPU ranks have no HBM: TorchRec counts the tables in DDR
    assert all(r.sparse_hbm_bytes == 0 for r in report.ranks)
    assert sum(t.ddr_bytes for t in report.tables) > 0


def test_infeasible_plan_names_table_and_figures() -> None:
    # t_205 pinned to one rank (table-wise, HBM-only kernel) cannot fit in 0.1 GiB per rank
    cfg = run_config(constraints={"t_205": {"sharding_types": ["table_wise"], "compute_kernels": ["fused"]}})
    cluster = api.Cluster(world_size=2, device="cuda", hbm_gb=0.1)
    with pytest.raises(PlanInfeasibleError) as info:
        api.what_if_plan(cfg, cluster, preset="aliccp-full")
    message = str(info.value)
    assert "t_205" in message
    need = re.search(r"table t_205: needs at least ([0-9.]+) GiB HBM", message)
    have = re.search(r"each rank has ([0-9.]+) GiB HBM", message)
    assert need and have, message
    rows = tables.load_preset("aliccp-full").num_embeddings["205"]
    weights_gib = rows * 20 * 4 / GIB  # fp32 weights alone, without optimiser state
    assert float(need.group(1)) >= weights_gib - 1e-3
    assert float(have.group(1)) == pytest.approx(0.1, abs=1e-3)
    assert float(need.group(1)) > float(have.group(1))


def test_infeasible_when_tables_fit_alone_but_not_together() -> None:
    # 2 CPU ranks of 0.33 GiB: the largest table (~0.32 GiB) fits on one, all of them (~0.7 GiB) do not
    cluster = api.Cluster(world_size=2, device="cpu", ddr_gb=0.33)
    with pytest.raises(PlanInfeasibleError) as info:
        api.what_if_plan(run_config(), cluster, preset="aliccp-full")
    message = str(info.value)
    assert "every table fits on a rank alone, but not all of them together" in message, message
    need = re.search(r"they need [0-9.]+ GiB HBM \+ ([0-9.]+) GiB DDR in all", message)
    have = re.search(r"2 ranks: [0-9.]+ GiB HBM, ([0-9.]+) GiB DDR in all", message)
    assert need and have, message
    assert float(have.group(1)) == pytest.approx(0.66, abs=1e-3)
    assert float(need.group(1)) > float(have.group(1))
    assert "t_205" in message  # listed among the largest tables


def test_hbm_first_search_matches_full_search_and_falls_back_to_uvm() -> None:
    cluster = api.Cluster(world_size=8, device="cuda", hbm_gb=80)
    fast = api.what_if_plan(run_config(hbm_first=True), cluster, preset="aliccp-full")
    full = api.what_if_plan(run_config(hbm_first=False), cluster, preset="aliccp-full")
    assert fast.meta["search"] == "hbm-first" and full.meta["search"] == "full"
    placement = lambda r: [(t.name, t.sharding_type, t.compute_kernel, t.ranks) for t in r.tables]  # noqa: E731
    assert placement(fast) == placement(full)
    # 4 ranks of 0.15 GiB HBM cannot hold the ~0.7 GiB of tables: the full search adds UVM kernels
    tight = api.what_if_plan(
        run_config(), api.Cluster(world_size=4, device="cuda", hbm_gb=0.15, ddr_gb=8), preset="aliccp-full"
    )
    assert tight.meta["search"] == "full"
    assert any(t.compute_kernel.startswith("fused_uvm") for t in tight.tables)
    check_plan_covers_tables(tight, 4)


def test_plan_json_round_trips(tmp_path: Path) -> None:
    cluster = api.Cluster(world_size=8, device="cuda", hbm_gb=80)
    report = api.what_if_plan(run_config(), cluster, preset="aliccp-full")
    assert report.plan is not None
    path = tmp_path / "plan.json"
    text = saved.plan_to_json(report.plan, report.meta, path=path)
    loaded, meta = saved.plan_from_json(path)
    assert meta == json.loads(text)["meta"]
    assert set(loaded.plan) == set(report.plan.plan)
    for module_path, module_plan in report.plan.plan.items():
        for table, ps in module_plan.items():
            back = loaded.plan[module_path][table]
            assert (back.sharding_type, back.compute_kernel, back.ranks) == (
                ps.sharding_type,
                ps.compute_kernel,
                ps.ranks,
            )
            if ps.sharding_spec is None:
                assert back.sharding_spec is None
            else:
                assert [
                    (s.shard_offsets, s.shard_sizes, str(s.placement)) for s in back.sharding_spec.shards
                ] == [(s.shard_offsets, s.shard_sizes, str(s.placement)) for s in ps.sharding_spec.shards]
    # and serialising the loaded plan again gives the same text
    assert saved.plan_to_json(loaded, meta) == text


def test_cli_json_output_is_a_loadable_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from ctnocvr_rec.plan import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    saved_path = tmp_path / "saved_path.json"
    args = parser.parse_args(
        [
            "plan",
            "--preset",
            "aliccp-full",
            "--world-size",
            "2",
            "--device",
            "cpu",
            "--format",
            "json",
            "--save",
            str(saved_path),
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    tree = json.loads(out)
    plan_from_stdout, _ = saved.plan_from_dict(tree)
    plan_from_file, _ = saved.plan_from_json(saved_path)
    assert str(plan_from_stdout) == str(plan_from_file)
    assert len(tree["report"]["ranks"]) == 2


def test_pooling_factor_constraint_reaches_the_perf_model() -> None:
    cluster = api.Cluster(world_size=2, device="cpu")

    def perf_of_table(pooling: float) -> float:
        pin = {"t_110_14": {"sharding_types": ["table_wise"], "pooling_factors": [pooling]}}
        report = api.what_if_plan(run_config(constraints=pin), cluster, preset="aliccp-full")
        return next(t.perf_ms for t in report.tables if t.name == "t_110_14")

    assert perf_of_table(200.0) > 2 * perf_of_table(20.0)


def test_cpu_row_wise_request_is_explained() -> None:
    cfg = PlanConfig(constraints={"t_101": {"sharding_types": ["row_wise"]}})
    with pytest.raises(ValueError, match="only on CUDA") as info:
        sharding.make_constraints(cfg, "cpu")
    assert "table_wise" in str(info.value)  # says what CPU offers
    uvm = PlanConfig(constraints={"t_101": {"compute_kernels": ["fused_uvm_caching"]}})
    with pytest.raises(ValueError, match="only on CUDA"):
        sharding.make_constraints(uvm, "cpu")
    # the same request is fine on CUDA
    assert sharding.make_constraints(cfg, "cuda")["t_101"].sharding_types == ["row_wise"]


def test_cli_constraint_on_cpu_reports_error_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    cluster = api.Cluster(world_size=2, device="cpu")
    table, entry = api.parse_constraint("t_101=row_wise")
    with pytest.raises(
        ValueError, match=r"plan.constraints.t_101.sharding_types: \['row_wise'\] exist only on CUDA"
    ):
        api.what_if_plan(run_config(), cluster, preset="aliccp-full", extra_constraints={table: entry})


def test_unknown_table_constraint_lists_tables() -> None:
    cluster = api.Cluster(world_size=2, device="cuda")
    with pytest.raises(ValueError, match="no table named 't_999'"):
        api.what_if_plan(
            run_config(),
            cluster,
            preset="aliccp-full",
            extra_constraints={"t_999": {"sharding_types": ["table_wise"]}},
        )


def test_cpu_sparse_optimiser_rule() -> None:
    with pytest.raises(ValueError, match="exact_rowwise_adagrad"):
        sharding.make_sharders(OptimConfig(sparse="adam"), "cpu")
    (sharder,) = sharding.make_sharders(OptimConfig(sparse="exact_adagrad", sparse_lr=0.3), "cpu")
    params = sharder.fused_params
    assert params["optimizer"].name == "EXACT_ADAGRAD" and params["learning_rate"] == 0.3
    assert (
        sharding.make_sharders(OptimConfig(sparse="adam"), "cuda")[0].fused_params["optimizer"].name == "ADAM"
    )


def test_id_dtype_rule() -> None:
    """int32 ids (batches and kernels) while every table has fewer than 2**31 rows, int64 beyond;
    the sharders hand fbgemm that dtype for indices and offsets alike."""
    import torch

    assert sharding.id_dtype([3, 2**31 - 1]) == torch.int32
    assert sharding.id_dtype([3, 2**31]) == torch.int64
    for ids in (torch.int32, torch.int64):
        params = sharding.make_sharders(OptimConfig(), "cpu", ids=ids)[0].fused_params
        assert params["embedding_table_index_type"] == params["embedding_table_offset_type"] == ids
    with pytest.raises(ValueError, match="ids must be torch.int32 or torch.int64"):
        sharding.fused_params(OptimConfig(), "cpu", torch.int16)


def test_comm_precision_rule() -> None:
    """plan.comm_*_precision: fp32 sends nothing through a codec, fp16 encodes the pooled all-to-all,
    bf16 is refused on CPU (gloo has none; TorchRec would silently send fp16), unknown names are named."""
    assert sharding.make_sharders(OptimConfig(), "cpu")[0].qcomm_codecs_registry is None
    (sharder,) = sharding.make_sharders(
        OptimConfig(), "cpu", PlanConfig(comm_forward_precision="fp16", comm_backward_precision="fp32")
    )
    codecs = sharder.qcomm_codecs_registry["POOLED_EMBEDDINGS_ALL_TO_ALL"]
    assert str(codecs.forward.quantized_dtype) == "torch.float16"
    assert str(codecs.backward.quantized_dtype) == "torch.float32"
    with pytest.raises(ValueError, match=r"plan.comm_backward_precision='bf16' has no cpu all-to-all"):
        sharding.make_sharders(OptimConfig(), "cpu", PlanConfig(comm_backward_precision="bf16"))
    with pytest.raises(ValueError, match=r"plan.comm_forward_precision='int4' is not one of"):
        sharding.make_sharders(OptimConfig(), "cpu", PlanConfig(comm_forward_precision="int4"))


def test_diff_shows_moved_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = api.Cluster(world_size=8, device="cuda", hbm_gb=80)
    base = api.what_if_plan(run_config(), cluster, preset="aliccp-full")
    moved_type = (
        "column_wise"
        if next(t for t in base.tables if t.name == "t_101").sharding_type != "column_wise"
        else "table_wise"
    )
    moved = api.what_if_plan(
        run_config(),
        cluster,
        preset="aliccp-full",
        extra_constraints={"t_101": {"sharding_types": [moved_type]}},
    )
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    saved.plan_to_json(base.plan, base.meta, path=a)
    saved.plan_to_json(moved.plan, moved.meta, path=b)
    lines = render.diff_plans(json.loads(a.read_text()), json.loads(b.read_text()))
    t101 = [line for line in lines if line.startswith("t_101:")]
    assert t101 and render.ABBREV[moved_type] + "/" in t101[0].split("->")[1]
    assert render.diff_plans(json.loads(a.read_text()), json.loads(a.read_text())) == []

    from ctnocvr_rec.plan.commands import _diff

    assert _diff([str(a), str(b)]) == 1
    assert "t_101" in capsys.readouterr().out


def test_saved_plan_refused_for_other_world_size_or_tables(tmp_path: Path) -> None:
    cluster = api.Cluster(world_size=2, device="cpu")
    report = api.what_if_plan(run_config(), cluster, prepared_dir=small_manifest(tmp_path))
    path = tmp_path / "plan.json"
    saved.plan_to_json(report.plan, report.meta, path=path)
    plan, meta = saved.plan_from_json(path)
    tables_now = list(meta["tables"])
    saved.check_plan_compatible(meta, 2, tables_now, plan, "cpu")  # accepted as is
    with pytest.raises(saved.PlanCompatibilityError, match="world size 2, but this run has 4 ranks"):
        saved.check_plan_compatible(meta, 4, tables_now, plan, "cpu")
    with pytest.raises(saved.PlanCompatibilityError, match=r"not in the plan \['t_new'\]"):
        saved.check_plan_compatible(meta, 2, tables_now + ["t_new"], plan, "cpu")
    with pytest.raises(saved.PlanCompatibilityError, match="device 'cpu'"):
        saved.check_plan_compatible(meta, 2, tables_now, plan, "cuda")
    # other table sizes: the same schema with a different vocabulary
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    from ctnocvr_rec.data.schema import load_schema

    schema = load_schema(SCHEMA)
    model, _ = tables.build_plannable_model(run_config().model, schema, {s.name: 7 for s in schema})
    with pytest.raises(saved.PlanCompatibilityError, match="other table sizes"):
        api.load_enforced_plan(path, model, 2, "cpu")


def test_bad_plan_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON \(line 1"):
        saved.plan_from_json(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        saved.plan_from_json(tmp_path / "missing.json")


def test_topology_and_reservations_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    topo = sharding.make_topology(16, 8, "cuda", hbm_gb=40, ddr_gb=100)
    assert topo.world_size == 16 and topo.devices[3].storage.hbm == 40 * GIB
    assert topo.devices[3].storage.ddr == 100 * GIB
    with pytest.raises(ValueError, match="must divide"):
        sharding.make_topology(10, 4, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kind in sharding.STORAGE_RESERVATIONS:
            sharding.build_planner(topo, 512, PlanConfig(storage_reservation=kind))
    assert not [r for r in caplog.records if "TopologyFactory" in r.getMessage() and r.levelname == "WARNING"]
    with pytest.raises(ValueError, match="storage_reservation"):
        sharding.build_planner(topo, 512, PlanConfig(storage_reservation="lots"))


def test_rank_ranges() -> None:
    assert render.rank_ranges([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
    assert render.rank_ranges([]) == "-"


def test_plan_has_both_ebcs_and_a_pre_split_plan_is_refused(tmp_path: Path) -> None:
    """The ranker has an unweighted and a weighted EBC: a plan covers all 23 Ali-CCP tables under two
    module FQNs, the weighted tables (those with a weighted field) under the weighted one. A plan made
    before the split (every table under ``sparse_arch.embedding_bag_collection``) is refused clearly."""
    from ctnocvr_rec.data.schema import load_schema

    schema = load_schema(SCHEMA)
    report = api.what_if_plan(run_config(), api.Cluster(world_size=2, device="cpu"), preset="aliccp-full")
    weighted_tables = sorted(schema.weighted_table_names)
    assert weighted_tables  # the real schema has weighted fields (the 14-day histories, 853)
    by_module = {fqn: sorted(module_plan) for fqn, module_plan in report.plan.plan.items()}
    assert by_module == {
        "sparse_arch.embedding_bag_collection": sorted(
            {s.table_name for s in schema} - set(weighted_tables)),
        "sparse_arch.weighted_embedding_bag_collection": weighted_tables,
    }
    assert len({t.name for t in report.tables}) == len(schema) == 23
    path = tmp_path / "plan.json"
    saved.plan_to_json(report.plan, report.meta, path=path)
    model, _ = tables.build_plannable_model(
        run_config().model, schema, tables.load_preset("aliccp-full").num_embeddings)
    assert set(api.load_enforced_plan(path, model, 2, "cpu").plan) == set(by_module)  # accepted as is

    tree = json.loads(path.read_text())
    modules = tree["modules"]
    merged = {**modules["sparse_arch.embedding_bag_collection"],
              **modules.pop("sparse_arch.weighted_embedding_bag_collection")}
    modules["sparse_arch.embedding_bag_collection"] = merged
    old = tmp_path / "old.json"
    old.write_text(json.dumps(tree))
    with pytest.raises(saved.PlanCompatibilityError,
                       match=r"old.json assigns tables to other embedding modules.*weighted_embedding_bag_collection"):
        api.load_enforced_plan(old, model, 2, "cpu")
