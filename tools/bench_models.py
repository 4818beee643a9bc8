"""Parameter counts and forward+backward time of the rankers, and the expert layers' matmul efficiency.

Usage::

    .venv/bin/python tools/bench_models.py                      # all rankers, paper defaults, 4096 rows
    .venv/bin/python tools/bench_models.py --rows-per-table 20000 --threads 2 --iters 10
    .venv/bin/python tools/bench_models.py --only experts       # wide-expert efficiency only
    .venv/bin/python tools/bench_models.py --prepared artifacts/data/prepared

Rankers: paper defaults from ``ModelConfig`` (dim 18, experts of 16 units, towers 300/200/80) on the
Ali-CCP schema. Table sizes come from ``--prepared`` (a prepared set's manifest), else every table gets
``--rows-per-table`` rows. Batches are synthetic (``ctnocvr_rec.models.testing``). Time is the median
of ``--iters`` timed forward+backward passes (after ``--warmup``) over one batch of ``--batch`` rows.
No optimiser step is timed.

Wide experts: one ``ExtractionLevel`` (CGC, shared input) with wide experts, forward+backward, in
GFLOP/s of its expert matmuls. The reference is a single GEMM with the same FLOPs (the machine's
matmul rate at that shape). The target is >= 70 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ctnocvr_rec.config import ModelConfig
from ctnocvr_rec.data.schema import load_schema
from ctnocvr_rec.models import ARCHS, build_model
from ctnocvr_rec.models.testing import SyntheticStream
from ctnocvr_rec.modules.experts import ExtractionLevel


def _median_seconds(fn: Callable[[], None], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_rankers(args: argparse.Namespace) -> list[dict[str, object]]:
    schema = load_schema(args.schema)
    if args.manifest:
        from ctnocvr_rec.data.prepared import PreparedSet

        folder = Path(args.manifest)  # the folder, or (as before) its manifest.json
        num_embeddings = PreparedSet.open(folder.parent if folder.is_file() else folder, schema).table_sizes()
    else:
        num_embeddings = {name: args.rows_per_table for name in schema.names}
    batch = SyntheticStream(schema, num_embeddings, batch_size=args.batch, seed=0).next_batch()
    rows = []
    for arch in ARCHS:
        for use_ctnocvr in (False, True):
            torch.manual_seed(0)
            model = build_model(ModelConfig(arch=arch, use_ctnocvr=use_ctnocvr), schema, num_embeddings,
                                device=torch.device("cpu"))
            ebcs = [model.sparse_arch.embedding_bag_collection, model.sparse_arch.weighted_embedding_bag_collection]
            sparse_params = sum(p.numel() for ebc in ebcs if ebc is not None for p in ebc.parameters())
            dense_params = sum(p.numel() for p in model.parameters()) - sparse_params

            def step(model: torch.nn.Module = model) -> None:
                model.zero_grad(set_to_none=True)
                loss, _ = model(batch)
                loss.backward()

            seconds = _median_seconds(step, args.warmup, args.iters)
            row = {
                "model": f"{arch}{'+ctnocvr' if use_ctnocvr else ''}",
                "dense_params": dense_params,
                "embedding_params": sparse_params,
                "fwd_bwd_ms_per_4096": 1000 * seconds * 4096 / args.batch,
            }
            rows.append(row)
            print(
                f"{row['model']:<14} dense {dense_params:>9,d}  embedding {sparse_params:>11,d}  "
                f"fwd+bwd {row['fwd_bwd_ms_per_4096']:8.2f} ms / 4096 rows",
                flush=True,
            )
    return rows


def bench_wide_experts(args: argparse.Namespace) -> dict[str, float]:
    rows, d, width = args.batch, args.expert_in, args.expert_width
    mk, ms, tasks = args.task_experts, args.shared_experts, 3
    level = ExtractionLevel(d, tasks, mk, ms, [width], shared_input=True)
    num_experts = level.num_experts
    x = torch.randn(rows, d, requires_grad=True)

    def experts_step() -> None:
        level.zero_grad(set_to_none=True)
        x.grad = None
        out, _, _, _ = level(x, x)
        out.sum().backward()

    # FLOPs of the expert matmuls only (fwd 2*B*d*E*w, bwd twice that); gates and mixing are extra
    # work counted against the layer.
    flops = 3 * 2 * rows * d * num_experts * width
    a = torch.randn(rows, d, requires_grad=True)
    w = torch.randn(d, num_experts * width, requires_grad=True)

    def gemm_step() -> None:
        a.grad = None
        w.grad = None
        (a @ w).sum().backward()

    # Interleave the two so that load from other processes hits both alike; the ratio is the median
    # of per-round ratios.
    for _ in range(args.warmup):
        experts_step()
        gemm_step()
    t_experts_all, t_gemm_all = [], []
    for _ in range(args.iters):
        t_experts_all.append(_median_seconds(experts_step, 0, 1))
        t_gemm_all.append(_median_seconds(gemm_step, 0, 1))
    t_experts, t_gemm = statistics.median(t_experts_all), statistics.median(t_gemm_all)
    efficiency = statistics.median(g / e for g, e in zip(t_gemm_all, t_experts_all))
    result = {
        "rows": rows, "in": d, "experts": num_experts, "width": width,
        "expert_layer_gflops": flops / t_experts / 1e9,
        "gemm_gflops": flops / t_gemm / 1e9,
        "efficiency": efficiency,
    }
    print(
        f"wide experts: B={rows} d={d} E={num_experts} ({tasks}x{mk} task + {ms} shared) width={width}: "
        f"{result['expert_layer_gflops']:.1f} GFLOP/s vs single GEMM {result['gemm_gflops']:.1f} GFLOP/s "
        f"-> {100 * result['efficiency']:.0f} % of the matmul rate",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["rankers", "experts"], default=None)
    parser.add_argument("--schema", default="aliccp", help="packaged schema name or YAML path")
    parser.add_argument("--prepared", "--manifest", dest="manifest", default="",
                        help="prepared set folder or its manifest.json (table sizes)")
    parser.add_argument("--rows-per-table", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--expert-in", type=int, default=512)
    parser.add_argument("--expert-width", type=int, default=256)
    parser.add_argument("--task-experts", type=int, default=2)
    parser.add_argument("--shared-experts", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    results: dict[str, object] = {"threads": args.threads, "batch": args.batch}
    if args.only in (None, "experts"):
        results["wide_experts"] = bench_wide_experts(args)
    if args.only in (None, "rankers"):
        results["rankers"] = bench_rankers(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
