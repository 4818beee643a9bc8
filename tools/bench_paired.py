"""Paired A/B of the N-rank training step: variants alternated window by window in one job.

    python tools/bench_paired.py --compare loop                 # bare pipeline vs the loop's collectives
    python tools/bench_paired.py --compare plan --bag-ids 0.75  # planner told ids per row vs + a per-row cost
    python tools/bench_paired.py --compare comms                # fp32 vs fp16 pooled all-to-alls
    python tools/bench_paired.py --compare overlap              # the two EBCs' all-to-alls overlapped vs not
    python tools/bench_paired.py --compare ids                  # int32 ids (batches + kernels) vs int64

On a shared host the speed drifts by 2x within minutes, so separate runs of tools/bench_train.py
(one variant per process, minutes apart) cannot resolve a few-percent change. Here every variant is
built once in the same torchrun job (same Ali-CCP-shaped workload, model and sizes as bench_train.py)
and the timed windows alternate between them (ABC, CBA, ...), so each window of one variant has a
neighbour of the other taken seconds apart; the paired ratio (variant / first variant, window by
window) is reported with its median.

``--compare comms``: the pooled all-to-alls in fp32 (default) vs fp16 (``plan.comm_*_precision``).
``--compare overlap``: FieldEmbedding as it is (both EBCs called before either result is read, so one
EBC's all-to-all overlaps the other's lookup) vs ``serial`` (the weighted EBC's result waited for first).
``--compare ids``: the ids as the trainer has them (int32 in the batches and fbgemm's kernels,
``plan.sharding.id_dtype``) vs ``int64`` (both, as before 2026-12-01).
``--compare loop``: ``none`` (bare ``TrainPipelineSparseDist.progress``), ``two`` (the loop before
2026-12-01: an all-reduce per batch handed out and one for the non-finite check) and ``one`` (the
loop's ``LockstepBatches``), on one model. ``--compare plan``: two DMP models, planned with each
table's pooling factor = ids per row (as the trainer) and = ids per row + ``--bag-ids``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train as bt  # noqa: E402
from bench_workload import add_fit_arguments, aliccp_workload, fit_prepared  # noqa: E402


def build_steps(ctx, args: argparse.Namespace, workload: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """Variant name -> one training step (collective), each on its own batch iterator."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from ctnocvr_rec.train.optim import build_optimizer
    from ctnocvr_rec.train.setup import build_sharded_model

    data = [bt.our_batch(raw, workload) for raw in bt.workload_batches(workload, args, seed=ctx.rank)]

    def pipeline_for(extra_ids: float, comm: str = "fp32", serial: bool = False, ids64: bool = False):
        from ctnocvr_rec.plan import sharding

        id_dtype = sharding.id_dtype
        if ids64:  # the kernels as before 2026-12-01: int64 whatever the table sizes
            sharding.id_dtype = lambda sizes: torch.int64
        with tempfile.TemporaryDirectory() as tmp:
            cfg = bt.our_config(Path(tmp) / f"r{ctx.rank}", args.model, args.size, workload)
            for spec in cfg.plan.constraints.values():
                spec["pooling_factors"] = [spec["pooling_factors"][0] + extra_ids]
            cfg.plan.comm_forward_precision = cfg.plan.comm_backward_precision = comm
            try:
                sharded = build_sharded_model(cfg, ctx)
            finally:
                sharding.id_dtype = id_dtype
        if serial:  # FieldEmbedding before 2026-12-01: the weighted EBC's result read before the other is called
            sparse_arch = sharded.model.module.sparse_arch
            sparse_arch.weighted_embedding_bag_collection = Eager(sparse_arch.weighted_embedding_bag_collection)
        optimizer, _ = build_optimizer(sharded.model, cfg.train.optim)
        return TrainPipelineSparseDist(sharded.model, optimizer, ctx.device)

    if args.compare == "loop":
        pipeline = pipeline_for(0.0)
        steps: dict[str, Callable[[], Any]] = {}
        for name in ("none", "two", "one"):
            source = itertools.cycle(data)
            if name == "none":
                steps[name] = lambda s=source: pipeline.progress(s)
            else:
                steps[name] = bt.loop_step(ctx, pipeline, source, name)
        return steps
    variants = {
        "plan": {"ids": {}, f"ids+{args.bag_ids:g}": {"extra_ids": args.bag_ids}},
        "comms": {"fp32": {}, "fp16": {"comm": "fp16"}},
        "overlap": {"overlap": {}, "serial": {"serial": True}},
        "ids": {"int32": {}, "int64": {"ids64": True}},
    }[args.compare]
    steps = {}
    for name, kwargs in variants.items():
        batches = [with_int64_ids(b) for b in data] if kwargs.get("ids64") else data
        pipeline, source = pipeline_for(**{"extra_ids": 0.0, **kwargs}), itertools.cycle(batches)
        steps[name] = lambda p=pipeline, s=source: p.progress(s)
    return steps


def with_int64_ids(batch):
    """``batch`` with its KJTs' ids widened to int64 (the loader's batches before 2026-12-01)."""
    import dataclasses

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    def widen(kjt):
        return None if kjt is None else KeyedJaggedTensor(
            keys=kjt.keys(), values=kjt.values().to(torch.int64), lengths=kjt.lengths(),
            weights=kjt.weights_or_none(), stride=kjt.stride())

    return dataclasses.replace(batch, sparse_features=widen(batch.sparse_features),
                               weighted_features=widen(batch.weighted_features))


class Eager(torch.nn.Module):
    """Wraps a sharded EBC so that its lazy result is waited for at once (no overlap with what follows)."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, features):
        return self.ebc(features).wait()


def worker(args: argparse.Namespace) -> None:
    from ctnocvr_rec.train.allocator import tune_host_allocator
    from ctnocvr_rec.train.api import enable_rank_stacks
    from ctnocvr_rec.train.distributed import barrier, init_distributed, shutdown

    enable_rank_stacks()
    tune_host_allocator()
    ctx = init_distributed("cpu")
    steps = build_steps(ctx, args, json.loads(Path(args.workload_file).read_text()))
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    names = list(steps)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for window in range(args.windows):
        for name in names if window % 2 == 0 else names[::-1]:
            barrier(ctx)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            barrier(ctx)
            rates[name].append(bt.BATCH * ctx.world_size * args.steps / (time.perf_counter() - t0))
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(rates))
    shutdown(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=["loop", "plan", "comms", "overlap", "ids"], required=True)
    parser.add_argument("--bag-ids", type=float, default=0.75,
                        help="plan: the extra pooling factor per table and row of the second variant")
    parser.add_argument("--model", default="mmoe", choices=list(bt.OUR_MODELS))
    parser.add_argument("--size", default="paper", choices=list(bt.SIZES))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5, help="steps per window")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--distinct-batches", type=int, default=8)
    add_fit_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    workload = aliccp_workload(fit_prepared(args))
    with tempfile.TemporaryDirectory() as tmp:
        wfile, out = Path(tmp) / "workload.json", Path(tmp) / "rates.json"
        wfile.write_text(json.dumps(workload))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, "--worker", *sys.argv[1:], "--workload-file", str(wfile), "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.nproc)))
        load0 = os.getloadavg()[0]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit("paired benchmark failed")
        rates = json.loads(out.read_text())
    names = list(rates)
    print(f"{args.model}/{args.size}, {args.nproc} ranks, {args.windows} windows of {args.steps} steps per variant, "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    for name in names:
        ratios = [a / b for a, b in zip(rates[name], rates[names[0]])]
        print(f"  {name:>10}: samples/s median {statistics.median(rates[name]):>8,.0f} "
              f"(min {min(rates[name]):,.0f}, max {max(rates[name]):,.0f}); paired ratio to {names[0]}: "
              f"median {statistics.median(ratios):.3f}, above 1 in {sum(r > 1 for r in ratios)}/{len(ratios)}")


if __name__ == "__main__":
    main()
