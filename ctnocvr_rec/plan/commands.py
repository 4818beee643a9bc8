"""`ctnocvr plan`: see, save and compare the embedding sharding plan for any cluster, on a laptop.

    ctnocvr plan --preset aliccp-full --world-size 64 --local-world-size 8 --device cuda \\
        --hbm-gb 80 --ddr-gb 512 --batch-size 4096 [--format table|markdown|json] [--save plan.json] \\
        [--constraint t_101=table_wise ...]
    ctnocvr plan --diff a.json b.json

torch/torchrec are imported inside the handler so that ``ctnocvr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    help_text = "embedding sharding plans: per table/rank placement, memory, perf; save/diff"
    p = sub.add_parser("plan", help=help_text, description=help_text)
    p.add_argument("-c", "--config", help="run config: YAML file or packaged name, e.g. mmoe (model dims, optimiser, plan constraints)")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, e.g. -o model.embedding_dim=24 (repeatable)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--prepared",
        metavar="DIR",
        help="prepared data set whose manifest.json gives table sizes "
        "(default: data.prepared_dir of the config)",
    )
    src.add_argument("--preset", metavar="NAME", help="built-in table sizes (aliccp-full) or a preset YAML path")
    p.add_argument("--world-size", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument(
        "--local-world-size", type=int, default=None, help="ranks per host (default min(world, 8))"
    )
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default=None,
        help="compute device of the ranks (default: train.device when cpu/cuda, else cuda)",
    )
    p.add_argument(
        "--hbm-gb", type=float, default=0.0, help="HBM per rank in GiB (default: plan.hbm_gb or TorchRec's)"
    )
    p.add_argument(
        "--ddr-gb",
        type=float,
        default=0.0,
        help="host memory per rank in GiB (default: plan.ddr_gb or TorchRec's)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="batch per rank (default data.batch_size)")
    p.add_argument(
        "--constraint",
        action="append",
        default=[],
        metavar="TABLE=TYPES[:KERNELS]",
        help="allowed sharding types (and kernels) of a table, e.g. t_205=row_wise:fused_uvm_caching",
    )
    p.add_argument(
        "--storage-reservation",
        choices=["fixed", "heuristic", "none"],
        default=None,
        help="storage reservation (default plan.storage_reservation)",
    )
    p.add_argument(
        "--reservation-pct",
        type=float,
        default=None,
        help="fraction of each rank's memory reserved, 0..1 (default plan.storage_reservation_percentage)",
    )
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    p.add_argument("--shards", action="store_true", help="also list every shard (rank, offsets, sizes)")
    p.add_argument("--save", metavar="PLAN_JSON", help="write the plan for `ctnocvr train --plan`")
    p.add_argument(
        "--diff", nargs=2, metavar=("A_JSON", "B_JSON"), help="show what moved between two saved plans"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def _diff(paths: list[str]) -> int:
    from ctnocvr_rec.plan.render import diff_plans
    from ctnocvr_rec.plan.saved import plan_from_json

    trees = []
    for path in paths:
        plan_from_json(path)  # validates the file with a clear message
        trees.append(json.loads(Path(path).read_text(encoding="utf-8")))
    lines = diff_plans(trees[0], trees[1], paths[0], paths[1])
    if not lines:
        print(f"{paths[0]} and {paths[1]}: same placement")
        return 0
    print(f"--- {paths[0]}\n+++ {paths[1]}")
    print("\n".join(lines))
    return 1


def run(args: argparse.Namespace) -> int:
    if args.diff:
        return _diff(args.diff)

    from ctnocvr_rec.config import load_config
    from ctnocvr_rec.plan.api import Cluster, parse_constraint, what_if_plan
    from ctnocvr_rec.plan.render import render_report
    from ctnocvr_rec.plan.saved import plan_to_dict, plan_to_json

    cfg = load_config(args.config, args.override)
    if args.storage_reservation is not None:
        cfg.plan.storage_reservation = args.storage_reservation
    if args.reservation_pct is not None:
        cfg.plan.storage_reservation_percentage = args.reservation_pct
    device = args.device or (cfg.train.device if cfg.train.device in ("cpu", "cuda") else "cuda")
    cluster = Cluster(
        world_size=args.world_size,
        local_world_size=args.local_world_size or min(args.world_size, 8),
        device=device,
        hbm_gb=args.hbm_gb,
        ddr_gb=args.ddr_gb,
        batch_size=args.batch_size or cfg.data.batch_size,
    )
    extra = dict(parse_constraint(c) for c in args.constraint)
    report = what_if_plan(
        cfg, cluster, prepared_dir=args.prepared, preset=args.preset, extra_constraints=extra
    )
    assert report.plan is not None
    if args.format == "json":
        tree = plan_to_dict(report.plan, report.meta)
        tree["report"] = report.to_dict()
        json.dump(tree, sys.stdout, indent=2)
        print()
    else:
        print(render_report(report, args.format, show_shards=args.shards))
    if args.save:
        plan_to_json(report.plan, report.meta, path=args.save)
        print(f"plan written to {args.save}", file=sys.stderr)
    return 0
