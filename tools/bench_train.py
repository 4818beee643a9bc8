"""Training throughput: our TorchRec rankers (1 and N CPU ranks) vs torch-rechub, at two sizes.

    python tools/bench_train.py                       # everything, both workloads (long: see docs/train.md)
    python tools/bench_train.py --ids aliccp --sizes paper --models mmoe --ranks 1 2 --no-parts
    python tools/bench_train.py --rechub-path artifacts/bench-site   # where torch-rechub is importable
    python tools/bench_train.py ... --profile /tmp/prof   # + a torch.profiler table per rank and run

Workloads (--ids, tools/bench_workload.py): ``aliccp`` (default) is Ali-CCP-shaped: the 23 fields of
the Ali-CCP schema with the table sizes of the ``aliccp-full`` plan preset (9.0 M rows), ids drawn
per field from a Zipf law fitted on a prepared set, hot ids scattered over each table, and per-field
list lengths drawn from that set. The set (--fit-set): ``fullshape`` (default, made once under
artifacts/bench-fit-fullshape by tools/make_fullshape.py at 1/200 scale) has Ali-CCP's per-request
shape: ~528 ids per row, the four weighted 14-day histories 509 of them; ``synth`` (the learning
generator, artifacts/bench-fit) has ~87 (histories ~69), the workload of the figures before
2026-12-01; --fit-on DIR fits on a prepared set of your own;
``uniform`` is the earlier workload (23 single-id unweighted fields, 20,000 rows each, uniform ids).
Sizes (batch 4096, embedding 18, towers 200/80, 3 tasks CTR/CVR/CTnoCVR):
  paper: 8 experts of 16 units (CGC/PLE: 4 shared + 4 per task) -- embedding-bound
  wide:  experts 256/128                                     -- compute-bound
Ours: the real trainer path (model on meta -> planner -> DMP with every table table-wise on the fused
row-wise Adagrad kernel -> dense Adam -> TrainPipelineSparseDist, glibc allocator tuned as
`ctnocvr train` does unless --no-tune-allocator), samples/s over all ranks. The planner is told each
table's mean ids per row (plan.constraints pooling_factors).
torch-rechub (optional, PyPI `torch-rechub`; it imports pandas): its MMOE / PLE / ESMM on the same ids
and dims, plain nn.Embedding + Adam over all parameters, as its own trainer does; multi-valued fields
go in as its SequenceFeature(pooling="sum") padded with 0 (no weights: it has no weighted pooling),
an absent single-valued field as the padding id 0. Measured as shipped and with the same allocator
tuning ("+malloc"), and the ratio is taken against the faster of the two. Not installed -> skipped.
Also printed: dense FLOPs per sample (forward + backward, torch's FlopCounter), the measured fp32
matmul rate of this machine ("% of matmul" says how compute-bound a run is), and the two parts of a
step timed alone: the fused tables (fbgemm's CPU kernel with its row-wise Adagrad update, the weighted
tables in their own TBE) and the dense arch + head + Adam. Their sum bounds a 1-rank step; on N ranks
the bound is N x batch per (embedding + dense) on one core each, with no communication.
Every figure is the median of --windows timed windows of --steps steps after --warmup steps (with
--rounds R, the median over R interleaved repetitions of every run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_workload

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_workload import (  # noqa: E402,I001
    RawBatch,
    add_fit_arguments,
    aliccp_workload,
    describe,
    fit_prepared,
    make_batches,
    to_table,
    uniform_workload,
)

EMB = 18
BATCH = 4096
SIZES: dict[str, dict[str, Any]] = {
    "paper": {"expert_hidden": [16]},
    "wide": {"expert_hidden": [256, 128]},
}
TOWERS = [200, 80]
OUR_MODELS = ("esmm", "mmoe", "cgc", "ple")
RECHUB_MODELS = ("esmm", "mmoe", "ple")


# ------------------------------------------------------------------------------------------ data


def load_workload(args: argparse.Namespace) -> dict[str, Any]:
    return json.loads(Path(args.workload_file).read_text())


def workload_batches(workload: dict[str, Any], args: argparse.Namespace, seed: int) -> list[RawBatch]:
    return make_batches(workload, args.distinct_batches, BATCH, seed)


def our_batch(raw: RawBatch, workload: dict[str, Any]):
    """The batch the trainer's loader would build from these rows (unweighted + weighted KJT)."""
    from ctnocvr_rec.data.batching import table_to_batch
    from ctnocvr_rec.data.schema import FieldSchema

    return table_to_batch(to_table(raw, workload), FieldSchema.from_dict(workload["schema"]))


# ------------------------------------------------------------------------------------------ ours


def our_config(root: Path, arch: str, size: str, workload: dict[str, Any]):
    from ctnocvr_rec.config import RunConfig
    from ctnocvr_rec.data.schema import FieldSchema

    root.mkdir(parents=True, exist_ok=True)
    import yaml

    from ctnocvr_rec.data.prepared import FORMAT, write_manifest

    (root / "schema.yaml").write_text(yaml.safe_dump(workload["schema"]))
    write_manifest(root, {"format": FORMAT, "schema": workload["schema"],
                          "num_embeddings": workload["num_embeddings"]})
    tables = sorted({f.table_name for f in FieldSchema.from_dict(workload["schema"])})
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
    # table-wise everywhere, and the planner told each table's mean ids per row (the trainer itself
    # assumes 1 unless plan.constraints.<table>.pooling_factors says otherwise)
    mean_len = {f"t_{name}": max(0.01, float(np.dot(p["length_values"], p["length_probs"])))
                for name, p in workload["profiles"].items()}
    cfg.plan.constraints = {t: {"sharding_types": ["table_wise"], "pooling_factors": [mean_len.get(t, 1.0)]}
                            for t in tables}
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


def bench_ours(ctx, arch: str, size: str, args: argparse.Namespace,
               workload: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """Samples/s over all ranks of the trainer's own DMP + pipeline path, and every rank's wall / user /
    system seconds per step (``cpu`` keys ``wall_r<rank>``, ...)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from ctnocvr_rec.train.distributed import barrier
    from ctnocvr_rec.train.optim import build_optimizer
    from ctnocvr_rec.train.setup import build_sharded_model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_config(Path(tmp) / f"r{ctx.rank}", arch, size, workload)
        cfg.plan.comm_forward_precision = cfg.plan.comm_backward_precision = args.comm_precision
        sharded = build_sharded_model(cfg, ctx)
    model = sharded.model
    if args.keep_weight_grads:  # the trainer before the fix: fbgemm computes the history weights' gradient
        from ctnocvr_rec.train.weight_grads import skip_per_sample_weight_grads

        skip_per_sample_weight_grads(model, enable=False)
    optimizer, _ = build_optimizer(model, cfg.train.optim)
    data = [our_batch(raw, workload) for raw in workload_batches(workload, args, seed=ctx.rank)]
    total = args.warmup + args.steps * (args.windows + (1 if args.profile else 0))
    batches = iter([data[i % len(data)] for i in range(total + 2)])
    pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device)
    step = lambda: pipeline.progress(batches)  # noqa: E731
    if args.loop_collectives != "none":  # what ctnocvr_rec/train/loop.py adds per step around the pipeline
        step = loop_step(ctx, pipeline, batches, args.loop_collectives)
        batches = None  # the loop step owns the iterator now
    for _ in range(args.warmup):
        step()
    barrier(ctx)
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    seconds = _timed_windows(step, 0, args.steps, args.windows, sync=lambda: barrier(ctx))
    usage1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    n = args.steps * args.windows
    # this rank's CPU per step over the timed windows: every thread of the process (the step's own,
    # gloo's and the pipeline's), user and system (the kernel side of gloo's TCP transport)
    mine = [(wall1 - wall0) / n, (usage1.ru_utime - usage0.ru_utime) / n, (usage1.ru_stime - usage0.ru_stime) / n]
    every = [None] * ctx.world_size
    torch.distributed.all_gather_object(every, mine)
    if args.profile:
        if ctx.is_main:
            from ctnocvr_rec.train.setup import describe_plan

            Path(args.profile).mkdir(parents=True, exist_ok=True)
            (Path(args.profile) / f"{workload['kind']}-{arch}-{size}-{ctx.world_size}r.plan.txt").write_text(
                describe_plan(sharded.plan) + "\n")
        profile_steps(step, args.steps,
                      Path(args.profile) / f"{workload['kind']}-{arch}-{size}-{ctx.world_size}r-rank{ctx.rank}")
    pipeline.detach()
    cpu = {f"{what}_r{r}": v for r, values in enumerate(every) for what, v in zip(("wall", "user", "sys"), values)}
    return BATCH * ctx.world_size / seconds, cpu


def loop_step(ctx, pipeline, batches, protocol: str):
    """One step as the trainer's loop takes it around the pipeline: batches in lock-step over the
    ranks and the non-finite-loss check after the step. ``protocol="one"``: the loop's own functions
    (one tiny all-reduce per step, train/lockstep.py); ``"two"``: the loop before 2026-12-01, one
    all-reduce per batch handed out (``synced_batches(..., until="any_done")``) and one for the check."""
    counter = iter(range(1, 10**9))
    if protocol == "one":
        from ctnocvr_rec.train.loop import loop_batches, loop_step_check

        synced = loop_batches(ctx, batches)

        def step() -> None:
            loop_step_check(ctx, next(counter), pipeline.progress(synced), synced)

        return step
    from ctnocvr_rec.train.distributed import all_reduce_cpu
    from ctnocvr_rec.train.evaluate import synced_batches

    old = synced_batches(ctx, batches, until="any_done")

    def old_step() -> None:
        outputs = pipeline.progress(old)
        flag = torch.tensor([0 if all(torch.isfinite(v).all() for k, v in outputs.items() if k.startswith("loss"))
                             else 1], dtype=torch.int32)
        all_reduce_cpu(ctx, flag, "max")
        if flag.item():
            raise RuntimeError(f"non-finite loss at step {next(counter)}")

    return old_step


def profile_steps(step, steps: int, stem: Path) -> None:
    """``steps`` steps under torch.profiler (CPU): ``<stem>.txt`` holds the pipeline's phases
    (``## ... ##`` ranges, by total time) and the top operators by self time, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    phases = sorted((e for e in events if e.key.startswith("##")), key=lambda e: -e.cpu_time_total)
    lines = [f"{steps} steps; ms per step (wall of the range, incl. children / self CPU)"]
    lines += [f"{e.cpu_time_total / 1e3 / steps:9.2f}  {e.key}" for e in phases]
    lines.append("")
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".txt").write_text("\n".join(lines))


def dense_flops_per_sample(arch: str, size: str, workload: dict[str, Any]) -> float:
    """Forward + backward FLOPs of the dense part per sample (embedding lookups not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ctnocvr_rec.models import build_model
    from ctnocvr_rec.modules.experts import ExtractionLevel
    from ctnocvr_rec.train.setup import model_inputs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_config(Path(tmp), arch, size, workload)
        schema, num_embeddings = model_inputs(cfg)
    model = build_model(cfg.model, schema, num_embeddings, device=torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, ExtractionLevel):
            module.compute_align = 1  # count the model's own FLOPs, not the zero padding of K (414 -> 416)
    batch = our_batch(make_batches(workload, 1, BATCH, seed=0)[0], workload)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(batch)
        loss.backward()
    return counter.get_total_flops() / BATCH


# ------------------------------------------------------------------------------------------ rechub


def rechub_model(arch: str, size: str, workload: dict[str, Any]) -> torch.nn.Module:
    """torch-rechub's model on the workload's fields: a ``SparseFeature`` per single-valued field and
    its own ``SequenceFeature(pooling="sum")`` per multi-valued one (no weights: it has no weighted
    pooling); row 0 is the padding row (``padding_idx=0``), so an absent field pools to zeros as ours."""
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.multi_task import ESMM, MMOE, PLE

    feats = []
    for f in workload["schema"]["fields"]:
        rows = workload["num_embeddings"][f["name"]]
        if f.get("multi_valued"):
            feats.append(SequenceFeature(f["name"], vocab_size=rows, embed_dim=EMB, pooling="sum", padding_idx=0))
        else:
            feats.append(SparseFeature(f["name"], vocab_size=rows, embed_dim=EMB, padding_idx=0))
    expert = {"dims": list(SIZES[size]["expert_hidden"])}
    towers = [{"dims": list(TOWERS)} for _ in range(3)]
    if arch == "mmoe":
        return MMOE(feats, ["classification"] * 3, n_expert=8, expert_params=expert, tower_params_list=towers)
    if arch == "ple":
        return PLE(feats, ["classification"] * 3, n_level=2, n_expert_specific=4, n_expert_shared=4,
                   expert_params=expert, tower_params_list=towers)
    # ESMM has no experts: its two towers see the concatenated embeddings (as ours)
    user = [f for f, spec in zip(feats, workload["schema"]["fields"]) if spec.get("group") == "user"]
    other = [f for f, spec in zip(feats, workload["schema"]["fields"]) if spec.get("group") != "user"]
    return ESMM(user, other, cvr_params={"dims": list(TOWERS)}, ctr_params={"dims": list(TOWERS)})


def rechub_inputs(raw: RawBatch, workload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """torch-rechub's input dict: ``[B]`` ids of a single-valued field (0 where absent), ``[B, L]``
    ids of a multi-valued one, zero-padded to the batch's longest list (its documented input)."""
    x = {}
    for f in workload["schema"]["fields"]:
        offsets, ids, _ = raw.fields[f["name"]]
        lengths = np.diff(offsets)
        if f.get("multi_valued"):
            width = max(1, int(lengths.max()))
            padded = np.zeros((raw.rows, width), dtype=np.int64)
            mask = np.arange(width)[None, :] < lengths[:, None]
            padded[mask] = ids  # row-major: each row's ids in order, then zeros
            x[f["name"]] = torch.from_numpy(padded)
        else:
            first = np.zeros(raw.rows, dtype=np.int64)
            first[lengths > 0] = ids[offsets[:-1][lengths > 0]]
            x[f["name"]] = torch.from_numpy(first)
    return x


def bench_rechub(arch: str, size: str, args: argparse.Namespace, workload: dict[str, Any]) -> float:
    model = rechub_model(arch, size, workload)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = [(rechub_inputs(raw, workload), torch.from_numpy(raw.click), torch.from_numpy(raw.conversion))
            for raw in workload_batches(workload, args, seed=0)]
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

    return BATCH / _timed_windows(step, args.warmup, args.rechub_steps or args.steps, args.windows)


def matmul_gflops(n: int = 2048, reps: int = 3, windows: int = 3) -> float:
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


def embedding_part_seconds(args: argparse.Namespace, workload: dict[str, Any]) -> float:
    """One step of the fused tables alone: fbgemm's CPU TBE (the kernel DMP's fused sharding uses),
    row-wise Adagrad, physical dim 20, forward + backward with the fused update; one TBE for the
    unweighted tables and one with per-sample weights for the weighted ones, as the model splits them."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    from ctnocvr_rec.modules.field_embedding import physical_dim

    def tbe(keys: list[str]) -> SplitTableBatchedEmbeddingBagsCodegen:
        specs = [(workload["num_embeddings"][k[2:]], physical_dim(EMB), EmbeddingLocation.HOST, ComputeDevice.CPU)
                 for k in keys]  # keys are f_<field>
        return SplitTableBatchedEmbeddingBagsCodegen(specs, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                     learning_rate=0.01)

    batches = [our_batch(raw, workload) for raw in workload_batches(workload, args, seed=1)]
    plain = tbe(batches[0].sparse_features.keys())
    weighted = None if batches[0].weighted_features is None else tbe(batches[0].weighted_features.keys())
    if weighted is not None and not args.keep_weight_grads:  # as the trainer's tables (train/setup.py)
        from ctnocvr_rec.train.weight_grads import skip_per_sample_weight_grads

        skip_per_sample_weight_grads(weighted)
    counter = iter(range(10**9))

    def step() -> None:
        b = batches[next(counter) % len(batches)]
        out = plain(b.sparse_features.values(), b.sparse_features.offsets()).sum()
        if weighted is not None:
            w = b.weighted_features
            out = out + weighted(w.values(), w.offsets(), per_sample_weights=w.weights()).sum()
        out.backward()

    return _timed_windows(step, args.warmup, args.steps, args.windows)


def dense_part_seconds(arch: str, size: str, args: argparse.Namespace, workload: dict[str, Any]) -> float:
    """One step of everything after the embedding lookup: the ranker's dense arch and head on a fixed
    ``[B, 414]`` input that needs a gradient (as the pooled embeddings do), backward, Adam."""
    from ctnocvr_rec.models import build_model
    from ctnocvr_rec.train.setup import model_inputs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_config(Path(tmp), arch, size, workload)
        schema, num_embeddings = model_inputs(cfg)
    model = build_model(cfg.model, schema, num_embeddings, device=torch.device("cpu"))
    dense = [p for n, p in model.named_parameters() if not n.startswith("sparse_arch.")]
    optimizer = torch.optim.Adam(dense, lr=1e-3)
    x = torch.randn(BATCH, model.sparse_arch.output_dim, requires_grad=True)
    raw = make_batches(workload, 1, BATCH, seed=0)[0]
    click, conversion = torch.from_numpy(raw.click), torch.from_numpy(raw.conversion)
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
    from ctnocvr_rec.train.api import enable_rank_stacks
    from ctnocvr_rec.train.distributed import init_distributed, shutdown

    enable_rank_stacks()  # as a trainer rank: a native crash prints the Python stacks first
    tune_allocator_if_asked(args)  # as `ctnocvr train` does (train.tune_host_allocator)
    ctx = init_distributed("cpu")
    workload = load_workload(args)
    results = {}
    for size in args.sizes:
        for arch in args.models:
            results[f"{arch}/{size}"], cpu = bench_ours(ctx, arch, size, args, workload)
            results.update({f"cpu:{arch}/{size}:{k}": v for k, v in cpu.items()})
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(results))
    shutdown(ctx)


def side_worker(args: argparse.Namespace) -> None:
    """One plain process: torch-rechub's models, or the embedding / dense parts of ours, on
    ``OMP_NUM_THREADS`` threads; writes JSON."""
    tune_allocator_if_asked(args)
    workload = load_workload(args)
    results: dict[str, float] = {}
    if args.side == "rechub":
        if args.rechub_path and Path(args.rechub_path).is_dir():
            sys.path.insert(0, args.rechub_path)
        for size in args.sizes:
            for arch in RECHUB_MODELS:
                if arch in args.models:
                    results[f"{arch}/{size}"] = bench_rechub(arch, size, args, workload)
    else:
        results["embedding"] = embedding_part_seconds(args, workload)
        for size in args.sizes:
            for arch in args.models:
                results[f"{arch}/{size}"] = dense_part_seconds(arch, size, args, workload)
    Path(args.out).write_text(json.dumps(results))


def common_flags(args: argparse.Namespace, workload_file: Path) -> list[str]:
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--windows", str(args.windows),
             "--sizes", *args.sizes, "--models", *args.models, "--rechub-path", args.rechub_path,
             "--distinct-batches", str(args.distinct_batches), "--workload-file", str(workload_file)]
    flags += ["--rechub-steps", str(args.rechub_steps)] if args.rechub_steps else []
    flags += ["--profile", args.profile] if args.profile else []
    flags += ["--keep-weight-grads"] if args.keep_weight_grads else []
    flags += ["--loop-collectives", args.loop_collectives, "--comm-precision", args.comm_precision]
    return flags + (["--no-tune-allocator"] if args.no_tune_allocator else [])


def run_json(cmd: list[str], threads: int, out: Path, what: str) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{what} failed")
    print(f"  [{what}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}]", flush=True)
    return json.loads(out.read_text())


def run_ranks(nproc: int, args: argparse.Namespace, workload_file: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", *common_flags(args, workload_file)]
        threads = max(1, (os.cpu_count() or 1) // nproc)
        return run_json(cmd, threads, Path(tmp) / "result.json", f"{nproc}-rank benchmark")


def run_side(side: str, threads: int, args: argparse.Namespace, workload_file: Path,
             tuned: bool = True) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--side", side, *common_flags(args, workload_file)]
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


def build_workload(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if kind == "uniform":
        return uniform_workload()
    prepared = fit_prepared(args)
    return aliccp_workload(prepared, args.preset, args.zipf_exponent, scatter=args.hot_ids == "scattered")


def median_of_rounds(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]} if rounds else {}


def bench_workload(kind: str, args: argparse.Namespace, threads: int, rechub_ok: bool) -> dict[str, Any]:
    """Every figure of one workload; with ``--rounds R`` the runs are repeated R times in turn
    (ours 1 rank, ours N ranks, torch-rechub, rechub + malloc, parts) and the median is kept."""
    workload = build_workload(kind, args)
    print(describe(workload), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        wfile = Path(tmp) / "workload.json"
        wfile.write_text(json.dumps(workload))
        flops = {f"{a}/{s}": dense_flops_per_sample(a, s, workload) for s in args.sizes for a in args.models}
        runs: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for n in args.ranks:
                runs.setdefault(f"ours{n}", []).append(run_ranks(n, args, wfile))
            if rechub_ok:
                runs.setdefault("rechub", []).append(run_side("rechub", threads, args, wfile, tuned=False))
                runs.setdefault("rechub_tuned", []).append(run_side("rechub", threads, args, wfile, tuned=True))
            if not args.no_parts:
                for t in sorted({threads, 1}):
                    runs.setdefault(f"parts{t}", []).append(run_side("parts", t, args, wfile))
    med = {k: median_of_rounds(v) for k, v in runs.items()}
    return {"workload": {k: workload[k] for k in ("kind", "source", "num_embeddings", "profiles", "scatter")},
            "dense_flops_per_sample": flops,
            "ours": {n: med[f"ours{n}"] for n in args.ranks},
            "rechub": med.get("rechub", {}), "rechub_tuned_malloc": med.get("rechub_tuned", {}),
            "parts_seconds": {t: med[f"parts{t}"] for t in sorted({threads, 1}) if f"parts{t}" in med},
            "rounds": runs}


def print_tables(res: dict[str, Any], args: argparse.Namespace, threads: int, gflops: float) -> None:
    flops, ours, rechub, rechub_tuned = (res["dense_flops_per_sample"], res["ours"], res["rechub"],
                                         res["rechub_tuned_malloc"])
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
    print_cpu(res, args, flops)
    parts = res["parts_seconds"]
    if parts:
        # The two parts every step must do, each timed alone: a step cannot be faster than their sum
        # (1 rank), or than the embedding on one core plus the dense part on one core, split over
        # all cores with no communication at all (N ranks).
        print(f"\nparts, ms per {BATCH} rows (embedding = the fused tables, row-wise Adagrad, alone; "
              f"dense = arch + head + Adam on a fixed input), and the samples/s bound they set:")
        many, one = parts[threads], parts[1]
        print(f"{'model/size':<12} {'emb ms':>7} {'dense ms':>9} {'emb 1t':>7} {'dense 1t':>9} "
              f"{'bound 1r':>9} {'bound Nr':>9} {'Nr/bound':>9} {'bound/rechub':>12}")
        for key in flops:
            bound_1r = BATCH / (many["embedding"] + many[key])
            bound_nr = threads * BATCH / (one["embedding"] + one[key])
            n_max = max(args.ranks)
            row = (f"{key:<12} {1e3 * many['embedding']:>7.1f} {1e3 * many[key]:>9.1f} "
                   f"{1e3 * one['embedding']:>7.1f} {1e3 * one[key]:>9.1f} {bound_1r:>9,.0f} {bound_nr:>9,.0f}"
                   f" {100 * ours[n_max][key] / bound_nr:>8.0f}%")
            if key in rechub:
                row += f" {max(bound_1r, bound_nr) / max(rechub[key], rechub_tuned[key]):>11.2f}x"
            print(row)


def print_cpu(res: dict[str, Any], args: argparse.Namespace, flops: dict[str, float]) -> None:
    """Per rank and step of our runs: wall, CPU (user / system, all threads of the rank's process) and
    how busy the rank kept its share of the cores; with the 1-thread parts, the CPU a rank spends
    beyond the embedding + dense work the bound counts (distribution, copies, gloo, Python)."""
    parts = res["parts_seconds"].get(1, {})
    print("\nCPU per rank and step, ms (getrusage over the timed windows; parts = emb 1t + dense 1t):")
    print(f"{'model/size':<12} {'ranks':>5} {'rank':>4} {'wall':>7} {'user':>7} {'sys':>6} {'CPU/wall':>8} "
          f"{'parts':>7} {'CPU - parts':>11}")
    for key in flops:
        for n in args.ranks:
            got = res["ours"][n]
            for r in range(n):
                wall, user, sys_ = (1e3 * got.get(f"cpu:{key}:{w}_r{r}", float("nan")) for w in ("wall", "user", "sys"))
                row = f"{key:<12} {n:>5} {r:>4} {wall:>7.1f} {user:>7.1f} {sys_:>6.1f} {(user + sys_) / wall:>8.2f}"
                if n > 1 and key in parts:
                    work = 1e3 * (parts["embedding"] + parts[key])
                    row += f" {work:>7.1f} {user + sys_ - work:>11.1f}"
                print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", nargs="+", default=["aliccp", "uniform"], choices=["aliccp", "uniform"],
                        help="workloads, each printed as its own table (see tools/bench_workload.py)")
    add_fit_arguments(parser)
    parser.add_argument("--preset", default="aliccp-full", help="plan preset giving the table sizes")
    parser.add_argument("--zipf-exponent", type=float, help="one exponent for every field instead of the fits")
    parser.add_argument("--hot-ids", choices=["scattered", "sorted"], default="scattered",
                        help="hot ids spread over each table by a permutation, or at rows 1..k")
    parser.add_argument("--distinct-batches", type=int, default=8, help="distinct batches per process, cycled")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--models", nargs="+", default=list(OUR_MODELS), choices=list(OUR_MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=6, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rechub-steps", type=int,
                        help="steps per timed window for torch-rechub (default --steps; its steps take seconds "
                        "on full-size tables, where fewer steps per window time it as well)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every run this many times, interleaved; medians are reported")
    parser.add_argument("--rechub-path", default=str(REPO / "artifacts" / "bench-site"),
                        help="extra sys.path entry holding torch_rechub (+ pandas) if not installed")
    parser.add_argument("--no-rechub", action="store_true")
    parser.add_argument("--no-parts", action="store_true", help="skip the embedding-only / dense-only timings")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="leave glibc malloc at its defaults in our runs (train.tune_host_allocator=false)")
    parser.add_argument("--keep-weight-grads", action="store_true",
                        help="let fbgemm compute the per-sample weights' gradient in our runs and parts "
                        "(as before train/weight_grads.py), for a before/after comparison")
    parser.add_argument("--loop-collectives", choices=["none", "one", "two"], default="none",
                        help="take each of our steps as the trainer's loop does: batches in lock-step over the "
                        "ranks and the non-finite-loss check, with the loop's one all-reduce per step (one, "
                        "train/lockstep.py) or the two of the loop before 2026-12-01 (two); none: the bare pipeline")
    parser.add_argument("--comm-precision", choices=["fp32", "fp16"], default="fp32",
                        help="precision of our pooled-embedding all-to-alls (plan.comm_*_precision; fp16 is "
                        "opt-in in the trainer: it rounds the embeddings and their gradients on the way)")
    parser.add_argument("--json", help="also write all figures to this file")
    parser.add_argument("--profile", help="folder: after timing, profile --steps more steps of each of our "
                        "runs on every rank (torch.profiler, CPU) into <folder>/<workload>-<model>-<size>-<N>r-rank<r>.txt")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["rechub", "parts"], help=argparse.SUPPRESS)
    parser.add_argument("--workload-file", help=argparse.SUPPRESS)
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
    rechub_ok = not args.no_rechub and rechub_importable(args.rechub_path)
    results = {kind: bench_workload(kind, args, threads, rechub_ok) for kind in args.ids}
    # The reference rate drifts between minutes on a shared host (124-152 GFLOP/s seen here): take it
    # at the start and at the end and use the higher one, which makes "% of matmul" the stricter.
    gflops_end = matmul_gflops()
    gflops = max(gflops_start, gflops_end)
    print(f"\nmachine: {threads} cores, torch {torch.__version__}, fp32 matmul {gflops_start:.1f} GFLOP/s at the "
          f"start, {gflops_end:.1f} at the end ({BATCH}x2048 @ 2048x2048; % of matmul uses {gflops:.1f}); "
          f"median of {args.windows} windows of {args.steps} steps, batch {BATCH}, {args.rounds} round(s), "
          f"load average at the end {os.getloadavg()[0]:.2f}; our pooled all-to-alls in {args.comm_precision}")
    for kind, res in results.items():
        print(f"\n== workload: {kind} ==")
        print_tables(res, args, threads, gflops)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "matmul_gflops": gflops, "matmul_gflops_start_end": [gflops_start, gflops_end],
            "load_average_end": os.getloadavg(), "args": vars(args), "workloads": results}, indent=1))


if __name__ == "__main__":
    main()
