"""Training throughput: our TorchRec rankers (1 and N CPU ranks) vs torch-rechub, at two sizes.

    python tools/bench_train.py                       # everything (about 10 minutes on 2 cores)
    python tools/bench_train.py --sizes paper --models mmoe --ranks 1 --no-parts
    python tools/bench_train.py --rechub-path artifacts/bench-site   # where torch-rechub is importable

Sizes (batch 4096, 23 single-id fields, embedding 18, towers 200/80, 3 tasks CTR/CVR/CTnoCVR):
  paper: 8 experts of 16 units (CGC/PLE: 4 shared + 4 per task) -- embedding-bound
  wide:  experts 256/128                                     -- compute-bound
Ours: the real trainer path (model on meta -> planner -> DMP with every table table-wise on the fused
row-wise Adagrad kernel -> dense Adam -> TrainPipelineSparseDist, glibc allocator tuned as
`ctnocvr train` does unless --no-tune-allocator), samples/s over all ranks.
torch-rechub (optional, PyPI `torch-rechub`; it imports pandas): its MMOE / PLE / ESMM on the same ids
and dims, plain nn.Embedding + Adam over all parameters, as its own trainer does; measured as shipped
and with the same allocator tuning ("+malloc"), and the ratio is taken against the faster of the two.
Not installed -> printed and skipped.
Also printed: dense FLOPs per sample (forward + backward, torch's FlopCounter), the measured fp32
matmul rate of this machine ("% of matmul" says how compute-bound a run is), and the two parts of a
step timed alone: the 23 fused tables (fbgemm's CPU kernel with its row-wise Adagrad update) and the
dense arch + head + Adam. Their sum bounds a 1-rank step; on N ranks the bound is N x batch per
(embedding + dense) on one core each, with no communication.
Every figure is the median of --windows timed windows of --steps steps after --warmup steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

FIELDS = 23
EMB = 18
VOCAB = 20_000
BATCH = 4096
SIZES: dict[str, dict[str, Any]] = {
    "paper": {"expert_hidden": [16]},
    "wide": {"expert_hidden": [256, 128]},
}
TOWERS = [200, 80]
OUR_MODELS = ("esmm", "mmoe", "cgc", "ple")
RECHUB_MODELS = ("esmm", "mmoe", "ple")


# ------------------------------------------------------------------------------------------ data


def schema_tree() -> dict[str, Any]:
    groups = ["user"] * 9 + ["item"] * 5 + ["combination"] * 4 + ["context"] * 5
    return {"fields": [{"name": f"x{i}", "group": groups[i]} for i in range(FIELDS)]}


def random_ids(steps: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (BATCH, FIELDS), generator=g) for _ in range(steps)]


def random_labels(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(ids[0, 0]))
    click = (torch.rand(BATCH, generator=g) < 0.3).float()
    conversion = click * (torch.rand(BATCH, generator=g) < 0.3).float()
    return click, conversion


def our_batch(ids: torch.Tensor, feature_names: list[str]):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from ctnocvr_rec.data.batch import CtnocvrBatch

    # the bench schema's fields are all unweighted: one unweighted KJT, weighted_features=None
    kjt = KeyedJaggedTensor(
        keys=feature_names,
        values=ids.t().reshape(-1).contiguous(),  # key-major: all rows of field 0, then field 1, ...
        lengths=torch.ones(FIELDS * BATCH, dtype=torch.int32),
    )
    click, conversion = random_labels(ids)
    return CtnocvrBatch.from_labels(kjt, click, conversion, weighted_features=None)


# ------------------------------------------------------------------------------------------ ours


def our_config(root: Path, arch: str, size: str):
    from ctnocvr_rec.config import RunConfig

    root.mkdir(parents=True, exist_ok=True)
    import yaml

    from ctnocvr_rec.data.prepared import FORMAT, write_manifest

    (root / "schema.yaml").write_text(yaml.safe_dump(schema_tree()))
    write_manifest(root, {"format": FORMAT, "schema": schema_tree(),
                          "num_embeddings": {f"x{i}": VOCAB for i in range(FIELDS)}})
    cfg = RunConfig()
    cfg.data.prepared_dir = str(root)
    cfg.data.schema = str(root / "schema.yaml")
    cfg.data.batch_size = BATCH
    cfg.model.arch = arch
    cfg.model.embedding_dim = EMB
    cfg.model.num_experts = 8
    cfg.model.num_shared_experts = 4
    cfg.model.num_task_experts = 4
    cfg.model.num_levels = 2
    cfg.model.expert_hidden = list(SIZES[size]["expert_hidden"])
    cfg.model.tower_hidden = list(TOWERS)
    cfg.train.device = "cpu"
    cfg.plan.constraints = {f"t_x{i}": {"sharding_types": ["table_wise"]} for i in range(FIELDS)}
    return cfg


def _timed_windows(step, warmup: int, steps: int, windows: int, sync=lambda: None) -> float:
    """Seconds per step: the median over ``windows`` timed windows of ``steps`` steps after ``warmup``."""
    for _ in range(warmup):
        step()
    sync()
    per_step = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        per_step.append((time.perf_counter() - t0) / steps)
    return statistics.median(per_step)


def bench_ours(ctx, arch: str, size: str, args: argparse.Namespace) -> float:
    """Samples/s over all ranks of the trainer's own DMP + pipeline path."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from ctnocvr_rec.train.distributed import barrier
    from ctnocvr_rec.train.optim import build_optimizer
    from ctnocvr_rec.train.setup import build_sharded_model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_config(Path(tmp) / f"r{ctx.rank}", arch, size)
        sharded = build_sharded_model(cfg, ctx)
    model = sharded.model
    optimizer, _ = build_optimizer(model, cfg.train.optim)
    names = sharded.schema.feature_names
    data = [our_batch(ids, names) for ids in random_ids(4, seed=ctx.rank)]
    total = args.warmup + args.steps * args.windows
    batches = iter([data[i % len(data)] for i in range(total + 2)])
    pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device)
    seconds = _timed_windows(lambda: pipeline.progress(batches), args.warmup, args.steps, args.windows,
                             sync=lambda: barrier(ctx))
    pipeline.detach()
    return BATCH * ctx.world_size / seconds


def dense_flops_per_sample(arch: str, size: str) -> float:
    """Forward + backward FLOPs of the dense part per sample (embedding lookups not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ctnocvr_rec.models import build_model
    from ctnocvr_rec.modules.experts import ExtractionLevel
    from ctnocvr_rec.train.setup import model_inputs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_config(Path(tmp), arch, size)
        schema, num_embeddings = model_inputs(cfg)
    model = build_model(cfg.model, schema, num_embeddings, device=torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, ExtractionLevel):
            module.compute_align = 1  # count the model's own FLOPs, not the zero padding of K (414 -> 416)
    batch = our_batch(random_ids(1, 0)[0][:256].repeat(16, 1), schema.feature_names)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(batch)
        loss.backward()
    return counter.get_total_flops() / BATCH


# ------------------------------------------------------------------------------------------ rechub


def rechub_model(arch: str, size: str) -> torch.nn.Module:
    from torch_rechub.basic.features import SparseFeature
    from torch_rechub.models.multi_task import ESMM, MMOE, PLE

    feats = [SparseFeature(f"x{i}", vocab_size=VOCAB, embed_dim=EMB) for i in range(FIELDS)]
    expert = {"dims": list(SIZES[size]["expert_hidden"])}
    towers = [{"dims": list(TOWERS)} for _ in range(3)]
    if arch == "mmoe":
        return MMOE(feats, ["classification"] * 3, n_expert=8, expert_params=expert, tower_params_list=towers)
    if arch == "ple":
        return PLE(feats, ["classification"] * 3, n_level=2, n_expert_specific=4, n_expert_shared=4,
                   expert_params=expert, tower_params_list=towers)
    # ESMM has no experts: its two towers see the concatenated embeddings (as ours)
    return ESMM(feats[:9], feats[9:], cvr_params={"dims": list(TOWERS)}, ctr_params={"dims": list(TOWERS)})


def bench_rechub(arch: str, size: str, args: argparse.Namespace) -> float:
    model = rechub_model(arch, size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = []
    for ids in random_ids(4, seed=0):
        x = {f"x{i}": ids[:, i] for i in range(FIELDS)}
        data.append((x, *random_labels(ids)))
    bce = torch.nn.BCELoss()
    counter = iter(range(10**9))

    def step() -> None:
        x, click, conversion = data[next(counter) % len(data)]
        out = model(x)  # [B, tasks] probabilities
        if arch == "esmm":  # (pCVR, pCTR, pCTCVR)
            loss = bce(out[:, 1], click) + bce(out[:, 2], conversion)
        else:
            ctnocvr = click * (1 - conversion)
            loss = bce(out[:, 0], click) + bce(out[:, 1], conversion) + bce(out[:, 2], ctnocvr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return BATCH / _timed_windows(step, args.warmup, args.steps, args.windows)


def matmul_gflops(n: int = 2048, reps: int = 4, windows: int = 5) -> float:
    """fp32 GEMM rate of this machine, ``[B, n] @ [n, n]``: the median of ``windows`` timed windows."""
    a, b = torch.randn(BATCH, n), torch.randn(n, n)
    torch.mm(a, b)
    per_mm = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        per_mm.append((time.perf_counter() - t0) / reps)
    return 2 * BATCH * n * n / statistics.median(per_mm) / 1e9


# ------------------------------------------------------------------------------------------ parts


def embedding_part_seconds(args: argparse.Namespace) -> float:
    """One step of the 23 fused tables alone: fbgemm's CPU TBE (the kernel DMP's fused sharding uses),
    row-wise Adagrad, unweighted, physical dim 20, forward + backward with the fused update."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    from ctnocvr_rec.modules.field_embedding import physical_dim

    spec = (VOCAB, physical_dim(EMB), EmbeddingLocation.HOST, ComputeDevice.CPU)
    tbe = SplitTableBatchedEmbeddingBagsCodegen([spec] * FIELDS, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                learning_rate=0.01)
    batches = [ids.t().reshape(-1).contiguous() for ids in random_ids(4, seed=1)]
    offsets = torch.arange(FIELDS * BATCH + 1)
    counter = iter(range(10**9))

    def step() -> None:
        tbe(batches[next(counter) % len(batches)], offsets).sum().backward()

    return _timed_windows(step, args.warmup, args.steps, args.windows)


def dense_part_seconds(arch: str, size: str, args: argparse.Namespace) -> float:
    """One step of everything after the embedding lookup: the ranker's dense arch and head on a fixed
    ``[B, 414]`` input that needs a gradient (as the pooled embeddings do), backward, Adam."""
    from ctnocvr_rec.models import build_model
    from ctnocvr_rec.train.setup import model_inputs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_config(Path(tmp), arch, size)
        schema, num_embeddings = model_inputs(cfg)
    model = build_model(cfg.model, schema, num_embeddings, device=torch.device("cpu"))
    dense = [p for n, p in model.named_parameters() if not n.startswith("sparse_arch.")]
    optimizer = torch.optim.Adam(dense, lr=1e-3)
    x = torch.randn(BATCH, model.sparse_arch.output_dim, requires_grad=True)
    click, conversion = random_labels(random_ids(1, 0)[0])
    ctnocvr = click * (1 - conversion)

    def step() -> None:
        loss, _ = model.head(model.task_logits(x), click, conversion, ctnocvr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return _timed_windows(step, args.warmup, args.steps, args.windows)


# ------------------------------------------------------------------------------------------ driver


def tune_allocator_if_asked(args: argparse.Namespace) -> None:
    if not args.no_tune_allocator:
        from ctnocvr_rec.train.allocator import tune_host_allocator

        tune_host_allocator()


def worker(args: argparse.Namespace) -> None:
    """One rank of a torchrun job: our models at the requested sizes; rank 0 writes JSON."""
    from ctnocvr_rec.train.distributed import init_distributed, shutdown

    tune_allocator_if_asked(args)  # as `ctnocvr train` does (train.tune_host_allocator)
    ctx = init_distributed("cpu")
    results = {}
    for size in args.sizes:
        for arch in args.models:
            results[f"{arch}/{size}"] = bench_ours(ctx, arch, size, args)
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(results))
    shutdown(ctx)


def side_worker(args: argparse.Namespace) -> None:
    """One plain process: torch-rechub's models, or the embedding / dense parts of ours, on
    ``OMP_NUM_THREADS`` threads; writes JSON."""
    tune_allocator_if_asked(args)
    results: dict[str, float] = {}
    if args.side == "rechub":
        if args.rechub_path and Path(args.rechub_path).is_dir():
            sys.path.insert(0, args.rechub_path)
        for size in args.sizes:
            for arch in RECHUB_MODELS:
                if arch in args.models:
                    results[f"{arch}/{size}"] = bench_rechub(arch, size, args)
    else:
        results["embedding"] = embedding_part_seconds(args)
        for size in args.sizes:
            for arch in args.models:
                results[f"{arch}/{size}"] = dense_part_seconds(arch, size, args)
    Path(args.out).write_text(json.dumps(results))


def common_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--windows", str(args.windows),
             "--sizes", *args.sizes, "--models", *args.models, "--rechub-path", args.rechub_path]
    return flags + (["--no-tune-allocator"] if args.no_tune_allocator else [])


def run_json(cmd: list[str], threads: int, out: Path, what: str) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{what} failed")
    return json.loads(out.read_text())


def run_ranks(nproc: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", *common_flags(args)]
        threads = max(1, (os.cpu_count() or 1) // nproc)
        return run_json(cmd, threads, Path(tmp) / "result.json", f"{nproc}-rank benchmark")


def run_side(side: str, threads: int, args: argparse.Namespace, tuned: bool = True) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--side", side, *common_flags(args)]
        if not tuned and "--no-tune-allocator" not in cmd:
            cmd.append("--no-tune-allocator")
        return run_json(cmd, threads, Path(tmp) / "result.json", f"{side} benchmark")


def rechub_importable(path: str) -> bool:
    if path and Path(path).is_dir():
        sys.path.insert(0, path)
    try:
        import torch_rechub  # noqa: F401
    except Exception as e:  # noqa: BLE001 - optional dependency: say why and go on
        print(f"torch-rechub not importable ({type(e).__name__}: {e}); skipping its figures. Install with "
              f"`pip install --target artifacts/bench-site --no-deps torch-rechub pandas python-dateutil "
              f"pytz tzdata six` (no CUDA torch is pulled).")
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--models", nargs="+", default=list(OUR_MODELS), choices=list(OUR_MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=6, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rechub-path", default=str(REPO / "artifacts" / "bench-site"),
                        help="extra sys.path entry holding torch_rechub (+ pandas) if not installed")
    parser.add_argument("--no-rechub", action="store_true")
    parser.add_argument("--no-parts", action="store_true", help="skip the embedding-only / dense-only timings")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="leave glibc malloc at its defaults in our runs (train.tune_host_allocator=false)")
    parser.add_argument("--json", help="also write all figures to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["rechub", "parts"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.side:
        side_worker(args)
        return

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    gflops_start = matmul_gflops()
    flops = {f"{a}/{s}": dense_flops_per_sample(a, s) for s in args.sizes for a in args.models}
    ours: dict[int, dict[str, float]] = {n: run_ranks(n, args) for n in args.ranks}
    rechub: dict[str, float] = {}
    rechub_tuned: dict[str, float] = {}
    if not args.no_rechub and rechub_importable(args.rechub_path):
        rechub = run_side("rechub", threads, args, tuned=False)
        rechub_tuned = run_side("rechub", threads, args, tuned=True)
    parts: dict[int, dict[str, float]] = {}
    if not args.no_parts:
        parts = {t: run_side("parts", t, args) for t in sorted({threads, 1})}
    # The reference rate drifts between minutes on a shared host (124-152 GFLOP/s seen here): take it
    # at the start and at the end and use the higher one, which makes "% of matmul" the stricter.
    gflops_end = matmul_gflops()
    gflops = max(gflops_start, gflops_end)
    print(f"machine: {threads} cores, torch {torch.__version__}, fp32 matmul {gflops_start:.1f} GFLOP/s at the "
          f"start, {gflops_end:.1f} at the end ({BATCH}x2048 @ 2048x2048; % of matmul uses {gflops:.1f}); "
          f"median of {args.windows} windows of {args.steps} steps, batch {BATCH}")

    header = f"{'model/size':<12} {'dense MFLOP/smp':>15}"
    header += "".join(f" {f'ours {n}r smp/s':>15}" for n in args.ranks)
    header += f" {'%matmul best':>12} {'rechub smp/s':>13} {'(+malloc)':>10} {'best/rechub':>11}"
    print(header)
    for key in flops:
        row = f"{key:<12} {flops[key] / 1e6:>15.2f}"
        row += "".join(f" {ours[n][key]:>15,.0f}" for n in args.ranks)
        best = max(ours[n][key] for n in args.ranks)
        row += f" {100 * best * flops[key] / 1e9 / gflops:>11.1f}%"
        if key in rechub:
            row += f" {rechub[key]:>13,.0f} {rechub_tuned[key]:>10,.0f} {best / max(rechub[key], rechub_tuned[key]):>10.2f}x"
        print(row)
    if parts:
        # The two parts every step must do, each timed alone: a step cannot be faster than their sum
        # (1 rank), or than the embedding on one core plus the dense part on one core, split over
        # both cores with no communication at all (2 ranks).
        print(f"\nparts, ms per {BATCH} rows (embedding = 23 fused tables, row-wise Adagrad, alone; "
              f"dense = arch + head + Adam on a fixed input), and the samples/s bound they set:")
        many, one = parts[threads], parts[1]
        print(f"{'model/size':<12} {'emb ms':>7} {'dense ms':>9} {'emb 1t':>7} {'dense 1t':>9} "
              f"{'bound 1r':>9} {'bound 2r':>9} {'bound/rechub':>12}")
        for key in flops:
            bound_1r = BATCH / (many["embedding"] + many[key])
            bound_nr = threads * BATCH / (one["embedding"] + one[key])
            row = (f"{key:<12} {1e3 * many['embedding']:>7.1f} {1e3 * many[key]:>9.1f} "
                   f"{1e3 * one['embedding']:>7.1f} {1e3 * one[key]:>9.1f} {bound_1r:>9,.0f} {bound_nr:>9,.0f}")
            if key in rechub:
                row += f" {max(bound_1r, bound_nr) / max(rechub[key], rechub_tuned[key]):>11.2f}x"
            print(row)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "matmul_gflops": gflops, "matmul_gflops_start_end": [gflops_start, gflops_end],
            "dense_flops_per_sample": flops, "ours": ours, "rechub": rechub,
            "rechub_tuned_malloc": rechub_tuned, "parts_seconds": parts}, indent=1))


if __name__ == "__main__":
    main()
