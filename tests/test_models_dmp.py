"""2-rank DistributedModelParallel (gloo, CPU) + TrainPipelineSparseDist vs the unsharded ranker."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, archs: list[str]) -> None:
    # Runs in a fresh spawned interpreter.
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        for arch in archs:
            _check_arch(rank, arch)
    finally:
        dist.destroy_process_group()


def _check_arch(rank: int, arch: str) -> None:
    """One ranker (``arch`` or ``arch/method``): plan (table-, column-wise and data-parallel tables), DMP,
    pipeline, compare."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.distributed.types import ShardingType
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
    except ImportError:  # older layout
        from torchrec.distributed.embedding_types import EmbOptimType  # type: ignore[attr-defined,no-redef]

    from ctnocvr_rec.models import build_model
    from ctnocvr_rec.models.testing import (
        TINY_SIZES,
        SyntheticStream,
        copy_global_state,
        tiny_dense_schema,
        tiny_model_config,
        tiny_schema,
    )

    cpu = torch.device("cpu")
    # "@fp16": the pooled all-to-alls in fp16 (plan.comm_*_precision); "@int32": int32 ids in the
    # batches and the kernels (plan.sharding.id_dtype), against the unsharded model fed int64 ids
    arch, at, comm = arch.partition("@")
    ids32 = comm == "int32"
    comm = "" if ids32 else comm
    arch, plus, extra = arch.partition("+")
    schema = tiny_dense_schema(3) if plus and extra == "dense" else tiny_schema()
    arch, _, method = arch.partition("/")
    cfg = tiny_model_config(arch, use_ctnocvr=True)
    cfg.method = method or "base"

    torch.manual_seed(0)  # same reference weights on every rank
    reference = build_model(cfg, schema, TINY_SIZES, device=cpu)
    global_state = {k: v.detach().clone() for k, v in reference.state_dict().items()}

    model = build_model(cfg, schema, TINY_SIZES)  # meta: the planner places it, DMP materialises it
    sharders = [
        EmbeddingBagCollectionSharder(
            fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}
        )
    ]
    if comm or ids32:  # the trainer's own sharder builder, with the comms precision of the plan config
        from ctnocvr_rec.config import OptimConfig, PlanConfig
        from ctnocvr_rec.plan.sharding import make_sharders

        precision = comm or "fp32"
        sharders = make_sharders(OptimConfig(sparse_lr=0.05), "cpu",
                                 PlanConfig(comm_forward_precision=precision, comm_backward_precision=precision),
                                 ids=torch.int32 if ids32 else torch.int64)
    constraints = {
        "t_user": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]),
        "t_item": ParameterConstraints(sharding_types=[ShardingType.COLUMN_WISE.value]),
        "t_tag": ParameterConstraints(sharding_types=[ShardingType.DATA_PARALLEL.value]),
        "t_u_hist": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]),
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=WORLD_SIZE, compute_device="cpu"), constraints=constraints
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=cpu, plan=plan, sharders=sharders)
    # DMP materialised the meta dense part through our reset_parameters: finite, non-zero, and
    # within nn.Linear's init bound 1/sqrt(fan_in) <= 1 (uninitialised memory would not be).
    for name, value in dmp.state_dict().items():
        if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
            assert torch.isfinite(value).all() and 0 < value.abs().max() <= 1, name
    copy_global_state(dmp.state_dict(), global_state)
    sparse_arch = dmp.module.sparse_arch
    plain_ebc, weighted_ebc = sparse_arch.embedding_bag_collection, sparse_arch.weighted_embedding_bag_collection
    assert type(plain_ebc).__name__ == type(weighted_ebc).__name__ == "ShardedEmbeddingBagCollection"
    # one plan entry per EBC; the shared t_tag is weighted (u_tag is), so it is in the weighted EBC
    assert set(plan.plan) == {"sparse_arch.embedding_bag_collection", "sparse_arch.weighted_embedding_bag_collection"}
    assert set(plan.plan["sparse_arch.weighted_embedding_bag_collection"]) == {"t_u_hist", "t_tag"}
    planned = {name: ps.sharding_type for module_plan in plan.plan.values() for name, ps in module_plan.items()}
    for table, constraint in constraints.items():
        assert planned[table] in constraint.sharding_types, (table, planned[table])

    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.SGD(params, lr=0.05),
    )
    optimizer = CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense)])
    stream = SyntheticStream(schema, TINY_SIZES, batch_size=32, seed=100 + rank)
    batches = [stream.next_batch() for _ in range(5)]  # int64 ids: what the reference is fed
    dmp_batches = [_with_int32_ids(b) for b in batches] if ids32 else batches
    # the id dtype every fused kernel is handed (TorchRec keeps the lookups out of named_modules)
    kernel_ids = {emb._embedding_table_index_type for ebc in (plain_ebc, weighted_ebc) for lookup in ebc._lookups
                  for emb in getattr(lookup, "module", lookup)._emb_modules}  # .module: DDP-wrapped (DP tables)
    assert kernel_ids == {torch.int32 if ids32 else torch.int64}, kernel_ids
    with torch.no_grad():  # the pooled embeddings, through the sharded EBCs' all-to-alls
        pooled = dmp.module.sparse_arch(dmp_batches[0].sparse_features, dmp_batches[0].weighted_features)
        pooled_diff = (pooled - reference.sparse_arch(batches[0].sparse_features,
                                                      batches[0].weighted_features)).abs().max().item()
    print(f"rank {rank} {arch}{at}{comm}: pooled embeddings differ by {pooled_diff:.3g}")
    # fp16 on the wire rounds them (relative 2**-11); fp32 moves them unchanged
    assert (pooled_diff > 1e-6) if comm == "fp16" else (pooled_diff < 1e-6), (rank, comm, pooled_diff)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device=cpu)

    it = iter(dmp_batches)
    first = pipeline.progress(it)
    # both sharded EBCs get their input distribution pipelined (fed by getattr on the batch)
    pipelined = {id(m) for m in pipeline._pipelined_modules}
    assert pipelined == {id(plain_ebc), id(weighted_ebc)}, "a sharded EBC was not pipelined"

    with torch.no_grad():
        ref_loss, ref_out = reference(batches[0])
    diff = abs(first["loss"].item() - ref_loss.item())
    assert set(first) == set(ref_out)
    if comm:
        # fp16 on the wire: close to the unsharded model
        worst = max((first[k] - v).abs().max().item() for k, v in ref_out.items())
        assert worst < 1e-3 and diff < 1e-3, (rank, diff, worst)
    else:
        assert diff < TOLERANCE, f"rank {rank}: DMP loss {first['loss'].item()} vs unsharded {ref_loss.item()}"
        for key, value in ref_out.items():
            torch.testing.assert_close(first[key], value, atol=TOLERANCE, rtol=0, msg=lambda m, k=key: f"{k}: {m}")

    losses = [first["loss"].item()]
    while True:
        try:
            losses.append(pipeline.progress(it)["loss"].item())
        except StopIteration:
            break
    assert len(losses) == len(batches) and all(map(torch.isfinite, torch.tensor(losses)))


def _with_int32_ids(batch):
    """``batch`` with its KJTs' ids (values) as int32, lengths and weights unchanged."""
    import dataclasses

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    def int32_ids(kjt):
        if kjt is None:
            return None
        return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().to(torch.int32), lengths=kjt.lengths(),
                                 weights=kjt.weights_or_none(), stride=kjt.stride())

    out = dataclasses.replace(batch, sparse_features=int32_ids(batch.sparse_features),
                              weighted_features=int32_ids(batch.weighted_features))
    assert out.sparse_features.values().dtype == torch.int32
    return out


@pytest.mark.slow
def test_two_rank_dmp_pipeline_matches_unsharded_loss():
    # PLE (the deepest dense part, three tasks) and ESMM (towers on the embedding) in one spawn, and two
    # CVR methods with their own towers (the pipeline's fx trace sees their objective as a leaf module)
    mp.spawn(_worker, args=(_free_port(), ["ple", "esmm", "mmoe/escm2_dr", "esmm/dcmt"]), nprocs=WORLD_SIZE,
             join=True)


@pytest.mark.slow
def test_two_rank_dmp_pipeline_with_dense_features():
    # the dense arch is data-parallel (DDP) next to the sharded tables; the batch's dense tensor rides
    # through the pipeline's copy and fx trace
    mp.spawn(_worker, args=(_free_port(), ["mmoe+dense"]), nprocs=WORLD_SIZE, join=True)


@pytest.mark.slow
def test_two_rank_dmp_pipeline_with_fp16_embedding_comms():
    # plan.comm_*_precision=fp16: TorchRec's fp16 codec on the table-/column-wise all-to-alls (gloo)
    mp.spawn(_worker, args=(_free_port(), ["mmoe@fp16", "mmoe@fp32"]), nprocs=WORLD_SIZE, join=True)


@pytest.mark.slow
def test_two_rank_dmp_pipeline_with_int32_ids():
    # int32 ids in the batch (the loader's, data/batching.py) and in fbgemm's table-wise, column-wise
    # and data-parallel kernels (the sharders' embedding_table_index_type): the same losses and
    # outputs as the unsharded model fed int64 ids
    mp.spawn(_worker, args=(_free_port(), ["mmoe@int32"]), nprocs=WORLD_SIZE, join=True)
