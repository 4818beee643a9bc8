"""`ctnocvr experiment table3 | sweep | compare | when-helps` and `ctnocvr report ranking`.

Heavy imports (numpy, pyarrow, matplotlib, torch through the trainer) happen inside the handlers,
so ``ctnocvr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ctnocvr_rec import registry  # names only, no torch

DEFAULT_EXPERIMENT = "synth_preset"  # packaged: ctnocvr_rec/configs/experiments/synth_preset.yaml


def _command_line() -> str:
    return "ctnocvr " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _add_experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_EXPERIMENT, help="experiment YAML file or packaged experiment name (default %(default)s)")
    parser.add_argument("--out", default="", help="output folder (default: the config's out_dir)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the config's)")
    parser.add_argument("--archs", nargs="+", help=f"{' '.join(registry.ARCHS)} (default: the config's)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per training run (default 1)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; tabulate finished runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override for every run, e.g. --set train.steps=200 (repeatable)")  # fmt: skip


def _load(args: argparse.Namespace):
    from ctnocvr_rec.experiments.spec import load_experiment

    exp = load_experiment(args.config, args.overrides)
    if args.out:
        exp.out_dir = args.out
    return exp


def _table3(args: argparse.Namespace) -> int:
    from ctnocvr_rec.experiments.data_setup import run_data_setup
    from ctnocvr_rec.experiments.table3 import run_table3

    exp = _load(args)
    if args.seeds:
        exp.table3.seeds = args.seeds
    if args.archs:
        exp.table3.archs = args.archs
    if not args.report_only:
        run_data_setup(exp)
    md = run_table3(exp, nproc=args.nproc, gt_dir=args.ground_truth, report_only=args.report_only,
                    command=_command_line())  # fmt: skip
    print(md.read_text(encoding="utf-8"))
    print(f"written: {md}, {md.with_suffix('.csv')}, {md.parent / 'table3_runs.csv'}", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ctnocvr_rec.experiments.compare import run_compare
    from ctnocvr_rec.experiments.data_setup import run_data_setup

    exp = _load(args)
    if args.seeds:
        exp.compare.seeds = args.seeds
    if args.archs:
        exp.compare.archs = args.archs
    if args.methods:
        exp.compare.methods = args.methods
    if not args.report_only:
        run_data_setup(exp)
    md = run_compare(exp, nproc=args.nproc, gt_dir=args.ground_truth, report_only=args.report_only,
                     command=_command_line())  # fmt: skip
    print(md.read_text(encoding="utf-8"))
    print(f"written: {md}, {md.with_suffix('.csv')}, {md.with_suffix('.png')}, {md.parent / 'compare_runs.csv'}",
          file=sys.stderr)
    return 0


def _when_helps(args: argparse.Namespace) -> int:
    from ctnocvr_rec.experiments.when_helps import run_when_helps

    exp = _load(args)
    if args.seeds:
        exp.when_helps.seeds = args.seeds
    if args.archs:
        exp.when_helps.archs = args.archs
    if args.knobs:
        unknown = sorted(set(args.knobs) - set(exp.when_helps.knobs))
        if unknown:
            raise ValueError(f"--knobs {unknown}: not in the config's knobs {list(exp.when_helps.knobs)}")
        exp.when_helps.knobs = {k: v for k, v in exp.when_helps.knobs.items() if k in args.knobs}
    md = run_when_helps(exp, nproc=args.nproc, report_only=args.report_only, command=_command_line())
    print(md.read_text(encoding="utf-8"))
    print(f"written: {md}, {md.with_suffix('.csv')}, {md.with_suffix('.png')}, {md.parent / 'when_helps_runs.csv'}",
          file=sys.stderr)
    return 0


def _parse_grid(items: list[str]) -> dict[str, list[object]]:
    """``--grid key=v1,v2`` -> {key: [v1, v2]}; values are parsed as YAML scalars (ints stay ints)."""
    from ctnocvr_rec.yaml_strict import parse_yaml_value

    grids: dict[str, list[object]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid {item!r} must look like model.score_weight=0.001,0.01")
        key, values = item.split("=", 1)
        parsed = [parse_yaml_value(v, f"--grid {item}") for v in values.split(",") if v.strip()]
        if not parsed:
            raise ValueError(f"--grid {item!r}: no values")
        grids[key.strip()] = parsed
    return grids


def _sweep(args: argparse.Namespace) -> int:
    from ctnocvr_rec.experiments.data_setup import run_data_setup
    from ctnocvr_rec.experiments.spec import build_run_config
    from ctnocvr_rec.experiments.sweep import run_sweep

    exp = _load(args)
    if args.seeds:
        exp.sweep.seeds = args.seeds
    if args.archs:
        exp.sweep.archs = args.archs
    if args.grid:
        exp.sweep.grids = _parse_grid(args.grid)
    for key, values in exp.sweep.grids.items():
        for value in values:  # a bad key fails here, before any training
            build_run_config(exp, {key: value})
    if not args.report_only:
        run_data_setup(exp)
    csv_path = run_sweep(exp, nproc=args.nproc, report_only=args.report_only)
    print(csv_path.read_text(encoding="utf-8"))
    pngs = ", ".join(str(csv_path.parent / f"sweep_{k}.png") for k in exp.sweep.grids)
    print(f"written: {csv_path}, {csv_path.parent / 'sweep_runs.csv'}, {pngs}", file=sys.stderr)
    return 0


def _ranking(args: argparse.Namespace) -> int:
    from ctnocvr_rec.experiments.ranking import ranking_report

    gt_dir = args.ground_truth
    if args.all_seeds and (args.base or args.ctnocvr):
        raise ValueError("--all-seeds uses the --config experiment's table3 runs; drop --base/--ctnocvr")
    if args.base and args.ctnocvr:
        base, ctnocvr = Path(args.base), Path(args.ctnocvr)
        out = Path(args.out or "ranking_report")
        score, alpha, top_k = args.score or "pctcvr", args.alpha, args.top_k
    elif args.base or args.ctnocvr:
        raise ValueError(
            "give both --base and --ctnocvr run folders, or neither (then --config picks table3 runs)"
        )
    else:
        from ctnocvr_rec.experiments.spec import load_experiment

        exp = load_experiment(args.config, args.overrides)  # --out is the report folder here, not out_dir
        spec = exp.ranking
        arch = args.arch or spec.arch
        seed = spec.seed if args.seed is None else args.seed
        root = exp.output_dir / "table3" / arch
        base, ctnocvr = root / "base" / f"seed{seed}", root / "ctnocvr" / f"seed{seed}"
        out = Path(args.out) if args.out else exp.output_dir / "ranking"
        score = args.score or spec.score
        alpha = spec.alpha if args.alpha is None else args.alpha
        top_k = spec.top_k if args.top_k is None else args.top_k
        gt_dir = gt_dir or exp.ground_truth
        if args.all_seeds:
            from ctnocvr_rec.experiments.ranking_seeds import ranking_over_seeds

            md_path = ranking_over_seeds(
                root, exp.table3.seeds, out, split=args.split, gt_dir=gt_dir or None, score=score,
                alpha=1.0 if alpha is None else alpha, top_k=3 if top_k is None else top_k,
                command=_command_line(),
            )  # fmt: skip
            print(md_path.read_text(encoding="utf-8"))
            print(f"written: {md_path} and a report per seed under {out}/seed<N>/", file=sys.stderr)
            return 0
    ranking_report(base, ctnocvr, out, split=args.split, gt_dir=gt_dir or None, score=score,
                   alpha=1.0 if alpha is None else alpha, top_k=3 if top_k is None else top_k,
                   top_items=args.top_items, command=_command_line())  # fmt: skip
    print((out / "ranking.md").read_text(encoding="utf-8"))
    print(
        f"written: {out}/ranking.md, ranking_items.csv, ranking_summary.json, ranking_fig2.png",
        file=sys.stderr,
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    experiment = sub.add_parser(
        "experiment", help="experiment: table3 | sweep | compare | when-helps (Table 3, Fig. 3, CVR methods, regimes)"
    )
    exp_sub = experiment.add_subparsers(dest="experiment_command", required=True, metavar="EXPERIMENT")

    table3 = exp_sub.add_parser(
        "table3",
        help="ESMM/MMoE/CGC/PLE x {Base, +CTnoCVR} x seeds -> table3.md/.csv with paired tests",
        description="Resumable: runs whose metrics.json exists are not redone.",
    )
    _add_experiment_args(table3)
    table3.add_argument(
        "--ground-truth", default="", help="folder of ground_truth_<split>.parquet (oracle AUCs)"
    )
    table3.set_defaults(func=_table3)

    compare = exp_sub.add_parser(
        "compare",
        help="CVR methods x backbones x {without, with} CTnoCVR x seeds -> compare.md/.csv/.png",
        description="Resumable: runs whose metrics.json exists are not redone. Methods and backbones: "
                    "ctnocvr_rec/registry.py.",
    )
    _add_experiment_args(compare)
    compare.add_argument("--methods", nargs="+", help=f"{' '.join(registry.METHOD_NAMES)} (default: the config's)")
    compare.add_argument(
        "--ground-truth", default="", help="folder of ground_truth_<split>.parquet (oracle AUCs)"
    )
    compare.set_defaults(func=_compare, config="synth_compare")

    when_helps = exp_sub.add_parser(
        "when-helps",
        help="+CTnoCVR vs Base over synthetic regimes (clickbait, CVR, selection, rows) -> when_helps.md/.csv/.png",
        description="One knob of the synthetic world at a time; data made per regime by the library. "
                    "Resumable: data and runs that exist are not redone.",
    )
    _add_experiment_args(when_helps)
    when_helps.add_argument("--knobs", nargs="+", help="only these knobs of the config (default: all)")
    when_helps.set_defaults(func=_when_helps, config="synth_when_helps")

    sweep = exp_sub.add_parser(
        "sweep", help="one-at-a-time sweeps like Fig. 3 -> sweep.csv + sweep_<key>.png"
    )
    _add_experiment_args(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="replace the config's grids, e.g. --grid model.score_weight=0.001,0.01 (repeatable)")  # fmt: skip
    sweep.set_defaults(func=_sweep)

    report = sub.add_parser("report", help="report: ranking (the paper's Table 4 and Fig. 2)")
    rep_sub = report.add_subparsers(dest="report_command", required=True, metavar="REPORT")
    ranking = rep_sub.add_parser(
        "ranking",
        help="re-rank each request by Base and +CTnoCVR scores, compare exposed items",
        description="Either --base/--ctnocvr run folders, or --config to use that experiment's table3 runs.",
    )
    ranking.add_argument("--base", default="", help="run folder of the Base model")
    ranking.add_argument("--ctnocvr", default="", help="run folder of the +CTnoCVR model")
    ranking.add_argument(
        "--config", default=DEFAULT_EXPERIMENT, help="experiment YAML when no run folders given"
    )
    ranking.add_argument(
        "--arch", default="", help="with --config: which arch's table3 runs (default: config)"
    )
    ranking.add_argument("--seed", type=int, default=None, help="with --config: which seed (default: config)")
    ranking.add_argument("--all-seeds", action="store_true",
                         help="with --config: a report per table3 seed plus their aggregate with paired tests")  # fmt: skip
    ranking.add_argument("--split", default=None, help="evaluation split (default: the runs' metrics.json)")
    ranking.add_argument("--score", choices=["pctcvr", "pctr", "pcvr", "pctr_pcvr_alpha"], default=None,
                         help="ranking score (default pctcvr)")  # fmt: skip
    ranking.add_argument("--alpha", type=float, default=None, help="alpha of pctr_pcvr_alpha (default 1)")
    ranking.add_argument("--top-k", type=int, default=None, help="candidates exposed per request (default 3)")
    ranking.add_argument("--top-items", type=int, default=10, help="rows of the Table 4 listing (default 10)")
    ranking.add_argument("--ground-truth", default="", help="folder of ground_truth_<split>.parquet")
    ranking.add_argument("--out", default="", help="output folder")
    ranking.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    ranking.set_defaults(func=_ranking)
