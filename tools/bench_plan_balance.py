"""How even is the planner's table-wise split? Each rank's fused tables timed alone, in one process.

    python tools/bench_plan_balance.py                       # the trainer's plan for 2 ranks
    python tools/bench_plan_balance.py --bag-ids 0 0.75      # also a plan told ids per row + 0.75

For each plan (the planner of ``ctnocvr_rec.plan.sharding`` on the Ali-CCP-shaped workload of
tools/bench_train.py, every table table-wise, pooling factor = the table's ids per row + ``--bag-ids``),
the tables of each rank are built as DMP groups them (one fbgemm CPU TBE for the unweighted tables,
one for the weighted, row-wise Adagrad, dim 20) and stepped on the ids of the global batch (ranks x
4096 rows, as table-wise sharding hands every rank its tables' ids of all rows): forward + backward
with the fused update, on one thread. The ranks' steps alternate, so the host's drift hits all alike.
The slowest rank's time is what a step waits for; the difference is the imbalance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train as bt  # noqa: E402
import torch  # noqa: E402


def plan_tables(workload: dict, ranks: int, bag_ids: float) -> dict[int, list[str]]:
    """Rank -> the tables the trainer's planner puts there (pooling factors = ids per row + bag_ids)."""
    from ctnocvr_rec.models import build_model
    from ctnocvr_rec.plan import sharding
    from ctnocvr_rec.train.setup import model_inputs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = bt.our_config(Path(tmp), "mmoe", "paper", workload)
        schema, num_embeddings = model_inputs(cfg)
    for spec in cfg.plan.constraints.values():
        spec["pooling_factors"] = [spec["pooling_factors"][0] + bag_ids]
    model = build_model(cfg.model, schema, num_embeddings, device=torch.device("meta"))
    topology = sharding.make_topology(ranks, ranks, "cpu")
    constraints = sharding.make_constraints(cfg.plan, "cpu", list(sharding.table_shapes(model)))
    planner = sharding.build_planner(topology, bt.BATCH, cfg.plan, constraints, module=model)
    plan = planner.plan(model, sharding.make_sharders(cfg.train.optim, "cpu"))
    out: dict[int, list[str]] = {r: [] for r in range(ranks)}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            out[ps.ranks[0]].append(table)
    return out


def rank_step(tables: list[str], batches: list, workload: dict):
    """One step of a rank's fused tables on the batches' ids (``t_<field>`` tables, one field each)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    from ctnocvr_rec.modules.field_embedding import physical_dim
    from ctnocvr_rec.train.weight_grads import skip_per_sample_weight_grads

    feeds = []
    for kind in ("sparse_features", "weighted_features"):
        keys = [k for k in getattr(batches[0], kind).keys() if f"t_{k[2:]}" in tables]
        if not keys:
            continue
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(workload["num_embeddings"][k[2:]], physical_dim(bt.EMB), EmbeddingLocation.HOST, ComputeDevice.CPU)
             for k in keys], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01)
        weighted = kind == "weighted_features"
        if weighted:
            skip_per_sample_weight_grads(tbe)
        per_batch = []
        for b in batches:
            jts = [getattr(b, kind)[k] for k in keys]
            lengths = torch.cat([j.lengths() for j in jts])
            per_batch.append((torch.cat([j.values() for j in jts]), torch.ops.fbgemm.asynchronous_complete_cumsum(lengths),
                              torch.cat([j.weights() for j in jts]) if weighted else None))
        feeds.append((tbe, per_batch))
    counter = iter(range(10**9))

    def step() -> None:
        i = next(counter) % len(batches)
        out = sum((tbe(v, o, per_sample_weights=w) if w is not None else tbe(v, o)).sum()
                  for tbe, per_batch in feeds for v, o, w in [per_batch[i]])
        out.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--bag-ids", type=float, nargs="+", default=[0.0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per rank (median reported)")
    parser.add_argument("--steps", type=int, default=4, help="steps per repetition")
    from bench_workload import add_fit_arguments, aliccp_workload, fit_prepared, make_batches

    add_fit_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    workload = aliccp_workload(fit_prepared(args))
    batches = [bt.our_batch(raw, workload) for raw in make_batches(workload, 4, args.ranks * bt.BATCH, seed=1)]
    for bag_ids in args.bag_ids:
        split = plan_tables(workload, args.ranks, bag_ids)
        steps = {r: rank_step(t, batches, workload) for r, t in split.items()}
        for step in steps.values():
            step()
            step()
        times: dict[int, list[float]] = {r: [] for r in steps}
        for _ in range(args.reps):
            for r, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[r].append((time.perf_counter() - t0) / args.steps * 1e3)
        print(f"pooling factor = ids per row + {bag_ids:g}: fused tables of each rank, ms per step of "
              f"{args.ranks * bt.BATCH} rows (median of {args.reps}, 1 thread)")
        for r in steps:
            print(f"  rank {r}: {statistics.median(times[r]):6.1f} ms  {', '.join(sorted(split[r]))}")


if __name__ == "__main__":
    main()
