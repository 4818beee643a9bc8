"""Training throughput: our TorchRec rankers (1 and N CPU ranks) vs torch-rechub, at two sizes.

    python tools/bench_train.py                       # everything (a few minutes on 2 cores)
    python tools/bench_train.py --sizes paper --models mmoe --ranks 1
    python tools/bench_train.py --rechub-path artifacts/bench-site   # where torch-rechub is importable

Sizes (batch 4096, 23 single-id fields, embedding 18, towers 200/80, 3 tasks CTR/CVR/CTnoCVR):
  paper: 8 experts of 16 units (CGC/PLE: 4 shared + 4 per task) -- embedding-bound
  wide:  experts 256/128                                     -- compute-bound
Ours: the real trainer path (model on meta -> planner -> DMP with every table table-wise on the fused
row-wise Adagrad kernel -> dense Adam -> TrainPipelineSparseDist), samples/s over all ranks.
torch-rechub (optional, PyPI `torch-rechub`; it imports pandas): its MMOE / PLE / ESMM on the same ids
and dims, plain nn.Embedding + Adam over all parameters, as its own trainer does. Not installed ->
printed and skipped. Also printed: dense FLOPs per sample (forward + backward, torch's FlopCounter)
and the measured fp32 matmul rate of this machine, so "% of matmul" says how compute-bound a run is.
"""

from __future__ import annotations

import argparse
import json
import os
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

    kjt = KeyedJaggedTensor(
        keys=feature_names,
        values=ids.t().reshape(-1).contiguous(),  # key-major: all rows of field 0, then field 1, ...
        lengths=torch.ones(FIELDS * BATCH, dtype=torch.int32),
        weights=torch.ones(FIELDS * BATCH),
    )
    click, conversion = random_labels(ids)
    return CtnocvrBatch.from_labels(kjt, click, conversion)


# ------------------------------------------------------------------------------------------ ours


def our_config(root: Path, arch: str, size: str):
    from ctnocvr_rec.config import RunConfig

    root.mkdir(parents=True, exist_ok=True)
    import yaml

    (root / "schema.yaml").write_text(yaml.safe_dump(schema_tree()))
    (root / "manifest.json").write_text(json.dumps({"num_embeddings": {f"x{i}": VOCAB for i in range(FIELDS)}}))
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


def bench_ours(ctx, arch: str, size: str, steps: int, warmup: int) -> float:
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
    total = warmup + steps
    batches = iter([data[i % len(data)] for i in range(total + 2)])
    pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device)
    for _ in range(warmup):
        pipeline.progress(batches)
    barrier(ctx)
    t0 = time.perf_counter()
    for _ in range(steps):
        pipeline.progress(batches)
    barrier(ctx)
    elapsed = time.perf_counter() - t0
    pipeline.detach()
    return steps * BATCH * ctx.world_size / elapsed


def dense_flops_per_sample(arch: str, size: str) -> float:
    """Forward + backward FLOPs of the dense part per sample (embedding lookups not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ctnocvr_rec.models import build_model
    from ctnocvr_rec.train.setup import model_inputs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_config(Path(tmp), arch, size)
        schema, num_embeddings = model_inputs(cfg)
    model = build_model(cfg.model, schema, num_embeddings, device=torch.device("cpu"))
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


def bench_rechub(arch: str, size: str, steps: int, warmup: int) -> float:
    model = rechub_model(arch, size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = []
    for ids in random_ids(4, seed=0):
        x = {f"x{i}": ids[:, i] for i in range(FIELDS)}
        data.append((x, *random_labels(ids)))
    bce = torch.nn.BCELoss()

    def step(i: int) -> None:
        x, click, conversion = data[i % len(data)]
        out = model(x)  # [B, tasks] probabilities
        if arch == "esmm":  # (pCVR, pCTR, pCTCVR)
            loss = bce(out[:, 1], click) + bce(out[:, 2], conversion)
        else:
            ctnocvr = click * (1 - conversion)
            loss = bce(out[:, 0], click) + bce(out[:, 1], conversion) + bce(out[:, 2], ctnocvr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * BATCH / (time.perf_counter() - t0)


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(BATCH, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * BATCH * n * n * reps / (time.perf_counter() - t0) / 1e9


# ------------------------------------------------------------------------------------------ driver


def worker(args: argparse.Namespace) -> None:
    """One rank of a torchrun job: our models at the requested sizes; rank 0 writes JSON."""
    from ctnocvr_rec.train.distributed import init_distributed, shutdown

    ctx = init_distributed("cpu")
    results = {}
    for size in args.sizes:
        for arch in args.models:
            results[f"{arch}/{size}"] = bench_ours(ctx, arch, size, args.steps, args.warmup)
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(results))
    shutdown(ctx)


def run_ranks(nproc: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", "--out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--sizes", *args.sizes, "--models", *args.models]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{nproc}-rank benchmark failed")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--models", nargs="+", default=list(OUR_MODELS), choices=list(OUR_MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rechub-path", default=str(REPO / "artifacts" / "bench-site"),
                        help="extra sys.path entry holding torch_rechub (+ pandas) if not installed")
    parser.add_argument("--no-rechub", action="store_true")
    parser.add_argument("--json", help="also write all figures to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    gflops = matmul_gflops()
    print(f"machine: {threads} cores, torch {torch.__version__}, fp32 matmul {gflops:.1f} GFLOP/s "
          f"({BATCH}x2048 @ 2048x2048)")
    flops = {f"{a}/{s}": dense_flops_per_sample(a, s) for s in args.sizes for a in args.models}
    ours: dict[int, dict[str, float]] = {n: run_ranks(n, args) for n in args.ranks}
    rechub: dict[str, float] = {}
    if not args.no_rechub:
        if args.rechub_path and Path(args.rechub_path).is_dir():
            sys.path.insert(0, args.rechub_path)
        try:
            import torch_rechub  # noqa: F401
        except Exception as e:  # noqa: BLE001 - optional dependency: say why and go on
            print(f"torch-rechub not importable ({type(e).__name__}: {e}); skipping its figures. Install with "
                  f"`pip install --target artifacts/bench-site --no-deps torch-rechub pandas python-dateutil "
                  f"pytz tzdata six` (no CUDA torch is pulled).")
        else:
            for s in args.sizes:
                for a in RECHUB_MODELS:
                    if a in args.models:
                        rechub[f"{a}/{s}"] = bench_rechub(a, s, args.steps, args.warmup)

    header = f"{'model/size':<12} {'dense MFLOP/sample':>18}"
    header += "".join(f" {f'ours {n}r smp/s':>15}" for n in args.ranks)
    header += f" {'%matmul(1r)':>11} {'rechub smp/s':>13} {'ours/rechub':>11}"
    print(header)
    for key in flops:
        row = f"{key:<12} {flops[key] / 1e6:>18.2f}"
        row += "".join(f" {ours[n][key]:>15,.0f}" for n in args.ranks)
        first = ours[args.ranks[0]][key]
        row += f" {100 * first * flops[key] / 1e9 / gflops:>10.1f}%"
        if key in rechub:
            row += f" {rechub[key]:>13,.0f} {first / rechub[key]:>10.2f}x"
        print(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": gflops, "dense_flops_per_sample": flops,
                                               "ours": ours, "rechub": rechub}, indent=1))


if __name__ == "__main__":
    main()
