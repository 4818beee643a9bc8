"""The per-sample-weight gradient skip: same table updates, the weight-gradient kernel not run."""

from __future__ import annotations

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    EmbeddingLocation,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch.profiler import ProfilerActivity, profile

from ctnocvr_rec.train.weight_grads import skip_per_sample_weight_grads

GRAD_KERNEL = "fbgemm::split_embedding_codegen_grad_indice_weights_cpu"


def _tbe() -> SplitTableBatchedEmbeddingBagsCodegen:
    torch.manual_seed(0)
    specs = [(50, 8, EmbeddingLocation.HOST, ComputeDevice.CPU), (30, 8, EmbeddingLocation.HOST, ComputeDevice.CPU)]
    return SplitTableBatchedEmbeddingBagsCodegen(specs, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                 learning_rate=0.05)


def _batch():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 5, (2 * 16,), generator=g)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    n = int(offsets[-1])
    indices = torch.cat([torch.randint(0, 50, (int(lengths[:16].sum()),), generator=g),
                         torch.randint(0, 30, (n - int(lengths[:16].sum()),), generator=g)])
    return indices, offsets, torch.rand(n, generator=g)


def _train_steps(tbe: SplitTableBatchedEmbeddingBagsCodegen, weights_need_grad: bool = False, **kwargs):
    """Three steps; returns the tables, whether the weight-gradient kernel was told to skip every
    feature (its last argument, ``feature_requires_grad``, a ``[features]`` tensor instead of none)
    and the weights' gradient."""
    indices, offsets, weights = _batch()
    weights.requires_grad_(weights_need_grad)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            out = tbe(indices, offsets, per_sample_weights=weights, **kwargs)
            (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    shapes = [e.input_shapes for e in prof.key_averages(group_by_input_shape=True) if e.key == GRAD_KERNEL]
    skipped = bool(shapes) and all(s[-1] == [2] for s in shapes)
    return tbe.split_embedding_weights(), skipped, weights.grad


def test_same_table_updates_without_the_weight_gradient_kernel():
    plain_tables, plain_skipped, _ = _train_steps(_tbe())
    hooked = _tbe()
    assert skip_per_sample_weight_grads(hooked) == 1
    hooked_tables, hooked_skipped, _ = _train_steps(hooked)
    assert not plain_skipped and hooked_skipped
    for a, b in zip(plain_tables, hooked_tables):
        assert torch.equal(a, b)


def test_weights_that_need_a_gradient_still_get_it():
    hooked = _tbe()
    skip_per_sample_weight_grads(hooked)
    _, skipped, grad = _train_steps(hooked, weights_need_grad=True)
    assert not skipped and grad is not None and grad.abs().sum() > 0


def test_the_kernel_honours_feature_requires_grad():
    # what the hook relies on: told that no feature needs it, fbgemm computes no weight gradient
    _, skipped, grad = _train_steps(_tbe(), weights_need_grad=True,
                                    feature_requires_grad=torch.zeros(2, dtype=torch.int32))
    assert skipped and grad is not None and grad.abs().sum() == 0


def test_hook_is_removable_and_not_doubled():
    tbe = _tbe()
    skip_per_sample_weight_grads(tbe)
    skip_per_sample_weight_grads(tbe)
    assert len(tbe._forward_pre_hooks) == 1
    skip_per_sample_weight_grads(tbe, enable=False)
    assert len(tbe._forward_pre_hooks) == 0
    _, skipped, _ = _train_steps(tbe)
    assert not skipped


def test_the_trainer_hooks_the_sharded_weighted_tables(tmp_path):
    """``build_sharded_model`` (the trainer's DMP path) leaves every TBE hooked, the ones TorchRec
    keeps outside ``named_modules()`` included, and a pipelined step tells the kernel to skip."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from ctnocvr_rec.config import RunConfig
    from ctnocvr_rec.data.batching import table_to_batch
    from ctnocvr_rec.train.distributed import init_distributed, shutdown
    from ctnocvr_rec.train.optim import build_optimizer
    from ctnocvr_rec.train.setup import build_sharded_model
    from ctnocvr_rec.train.testing import SCHEMA_NAME, _split_table, write_tiny_prepared
    from ctnocvr_rec.train.weight_grads import table_batched_embeddings

    prepared = write_tiny_prepared(tmp_path / "prepared", {"train": 64, "valid": 8, "test": 8})
    cfg = RunConfig()
    cfg.data.prepared_dir, cfg.data.schema, cfg.data.batch_size = str(prepared), SCHEMA_NAME, 32
    cfg.train.device = "cpu"
    ctx = init_distributed("cpu")
    try:
        sharded = build_sharded_model(cfg, ctx)
        tbes = table_batched_embeddings(sharded.model)
        assert len(tbes) == 2  # one unweighted, one weighted group of tables
        assert all(len(t._forward_pre_hooks) == 1 for t in tbes)
        optimizer, _ = build_optimizer(sharded.model, cfg.train.optim)
        batches = iter([table_to_batch(_split_table(sharded.schema, 32, s, 1 + 32 * s, 5), sharded.schema) for s in range(4)])
        pipeline = TrainPipelineSparseDist(sharded.model, optimizer, ctx.device)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            pipeline.progress(batches)
        shapes = [e.input_shapes for e in prof.key_averages(group_by_input_shape=True) if e.key == GRAD_KERNEL]
        assert shapes and all(s[-1] == [5] for s in shapes)  # the 5 fields of the weighted tables
    finally:
        shutdown(ctx)
