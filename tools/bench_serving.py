"""Serving figures (a script that prints figures, not a timed test).

    PYTHONPATH=. python tools/bench_serving.py --work artifacts/bench_serving [--no-aot]

Builds a small synthetic set (``data synth`` -> ``data prepare``), trains MMoE + CTnoCVR on one rank
(or takes ``--run-dir``), exports it (fp32, int8 and, unless ``--no-aot``, the AOTInductor package,
timing the compilation), then prints:

* artifact sizes, float vs int8, and their ratio;
* latency per program call (p50 / p99 over ``--calls`` calls after warm-up) at batch 1, 64 and 512
  for fp32, int8 and aot on 1 and 2 threads (inputs: real test rows, already laid out; the layout
  cost of the ``Scorer`` is shown separately for a raw-id dict);
* ``ctnocvr predict`` rows/s on the prepared test split (fp32, int8) and on the raw test files;
* AUC per task of fp32 vs int8 on the test split (CVR on clicked rows), and the max |difference|.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(work: Path, rows_train: int, rows_test: int, aot: bool, run_dir: Path | None) -> tuple[Path, Path, Path]:
    import torch

    from ctnocvr_rec.config import load_config
    from ctnocvr_rec.data import prepare as prep
    from ctnocvr_rec.data import synth
    from ctnocvr_rec.serving.export import export_run
    from ctnocvr_rec.train.api import run_in_process

    raw, prepared, model = work / "raw", work / "prepared", work / "model"
    if not (raw / "sample_skeleton_test.csv").is_file():
        synth.generate(synth.SynthConfig(rows_train=rows_train, rows_test=rows_test, users=max(300, rows_train // 20),
                                         items=max(200, rows_train // 40), seed=0), raw)
    prep.prepare(prep.PrepareOptions(str(raw), str(prepared), schema="aliccp",
                                     progress=False))
    if run_dir is None:
        run_dir = work / "run"
        if not (run_dir / "metrics.json").is_file():
            cfg = load_config(None, [
                f"data.prepared_dir={prepared}", "data.schema=aliccp",
                f"train.run_dir={run_dir}", "data.batch_size=1024", "train.epochs=2", "model.arch=mmoe",
                "model.embedding_dim=18", "model.num_experts=4", "train.progress_bar=false", "train.device=cpu",
                "train.eval_every_steps=100000",
            ])
            run_in_process(cfg)
    if not (model / "serving.json").is_file() or (aot and not (model / "model_aot.pt2").is_file()):
        torch.set_num_threads(2)
        export_run(run_dir, model, aot=aot, force=True)
    return raw, prepared, model


def latency(model: Path, prepared: Path, precisions: list[str], calls: int) -> list[dict[str, object]]:
    import torch

    from ctnocvr_rec.data.dataset import ParquetBatchDataset
    from ctnocvr_rec.serving import Scorer

    rows = []
    batches = {b: next(iter(ParquetBatchDataset(prepared, "test", b))) for b in (1, 64, 512)}
    for precision in precisions:
        scorer = Scorer.load(model, precision=precision)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for b, batch in batches.items():
                inputs = scorer.encode(batch.sparse_features, batch.weighted_features, ids="mapped",
                                       dense=batch.dense).inputs
                n = calls if b < 512 else max(20, calls // 4)
                with torch.no_grad():
                    for _ in range(5):
                        scorer.program(*inputs)
                    times = []
                    for _ in range(n):
                        t = time.perf_counter()
                        scorer.program(*inputs)
                        times.append((time.perf_counter() - t) * 1e3)
                times.sort()
                rows.append({"precision": precision, "threads": threads, "batch": b, "calls": n,
                             "p50_ms": statistics.median(times), "p99_ms": times[min(n - 1, int(0.99 * n))]})
                print(f"  {precision:5s} {threads} thr batch {b:4d}: p50 {rows[-1]['p50_ms']:.2f} ms, "
                      f"p99 {rows[-1]['p99_ms']:.2f} ms ({n} calls)", flush=True)
    return rows


def encode_cost(model: Path, raw: Path) -> dict[str, float]:
    """Scorer.encode of a raw-id dict (validation + vocabulary mapping + layout), ms per call."""
    from ctnocvr_rec.serving import Scorer
    from ctnocvr_rec.serving.rawinput import RawReport, iter_raw_batches

    scorer = Scorer.load(model, precision="int8")
    c = scorer.contract
    user = [(f.field, f.weights_from_input) for f in c.features if f.group == "user"]
    other = [(f.field, f.weights_from_input) for f in c.features if f.group != "user"]
    out = {}
    for b in (1, 64, 512):
        rb = next(iter_raw_batches(raw, "test", user, other, b, RawReport()))
        features = {}
        for name, (ids, lengths, weights) in rb.columns.items():
            cuts = np.cumsum(lengths)[:-1]
            features[name] = [part.tolist() for part in np.split(ids, cuts)]
            if weights is not None:
                features[name + "__w"] = [part.tolist() for part in np.split(weights, cuts)]
        times = []
        for _ in range(30):
            t = time.perf_counter()
            scorer.encode(features)
            times.append((time.perf_counter() - t) * 1e3)
        out[str(b)] = statistics.median(times)
    return out


def aucs(path: Path) -> dict[str, float]:
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    t = pq.read_table(path)
    c = {n: t.column(n).to_numpy() for n in t.column_names}
    click, conv = c["click"].astype(bool), c["conversion"].astype(bool)
    return {
        "ctr": roc_auc_score(click, c["p_ctr"]),
        "cvr": roc_auc_score(conv[click], c["p_cvr"][click]),
        "ctcvr": roc_auc_score(click & conv, c["p_ctcvr"]),
        "ctnocvr": roc_auc_score(click & ~conv, c["p_ctnocvr"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="artifacts/bench_serving")
    ap.add_argument("--run-dir", help="export this run instead of training a small one")
    ap.add_argument("--rows-train", type=int, default=40_000)
    ap.add_argument("--rows-test", type=int, default=10_000)
    ap.add_argument("--calls", type=int, default=200, help="timed calls per latency cell (a quarter at batch 512)")
    ap.add_argument("--no-aot", action="store_true")
    args = ap.parse_args()
    import torch

    from ctnocvr_rec.serving.predict import predict

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    raw, prepared, model = build(work, args.rows_train, args.rows_test, not args.no_aot,
                                 Path(args.run_dir) if args.run_dir else None)
    contract = json.loads((model / "serving.json").read_text())
    files, programs = contract["files"], contract["programs"]
    fp32_b, int8_b = files["model_fp32.pt2"]["bytes"], files["model_int8.pt"]["bytes"]
    vocab_b = sum(v["bytes"] for k, v in files.items() if k.startswith("vocab/"))
    print(f"model: {contract['model']['arch']} step {contract['run']['step']}, tables "
          + ", ".join(f"{f['field']}:{f['num_embeddings']}" for f in contract["features"][:4]) + ", ...")
    print(f"sizes: fp32 {fp32_b / 1e6:.2f} MB, int8 {int8_b / 1e6:.2f} MB (ratio {fp32_b / int8_b:.2f}x)"
          + (f", aot {files['model_aot.pt2']['bytes'] / 1e6:.2f} MB" if "model_aot.pt2" in files else "")
          + f", vocab {vocab_b / 1e6:.2f} MB")
    for name, p in programs.items():
        print(f"build {name}: {p['build_s']:.1f}s, max |diff| vs the ranker {p['max_abs_diff_vs_ranker']:.2e}")
    precisions = ["fp32", "int8"] + (["aot"] if "aot" in programs else [])
    print("latency per program call:")
    lat = latency(model, prepared, precisions, args.calls)
    print("Scorer.encode of a raw-id dict (ms, median): " + ", ".join(
        f"batch {b}: {ms:.2f}" for b, ms in encode_cost(model, raw).items()))
    torch.set_num_threads(2)
    results = {}
    for precision in precisions:
        out = work / f"pred_{precision}.parquet"
        s = predict(model, out, precision=precision, prepared=prepared, batch_size=1024, progress=False)
        results[precision] = s
        print(f"predict --prepared ({precision}, 2 threads): {s['rows']:,} rows, {s['rows_per_s']:,.0f} rows/s "
              f"(program alone {s['rows'] / s['score_s']:,.0f} rows/s), load {s['load_s']:.1f}s")
    s = predict(model, work / "pred_raw.parquet", precision="int8", raw_dir=raw, batch_size=1024, progress=False)
    print(f"predict --raw-dir (int8, 2 threads): {s['rows']:,} rows, {s['rows_per_s']:,.0f} rows/s; unseen ids "
          f"{s['unseen_ids']:,} of {s['ids']:,}")
    a32, a8 = aucs(work / "pred_fp32.parquet"), aucs(work / "pred_int8.parquet")
    import pyarrow.parquet as pq

    p32, p8 = pq.read_table(work / "pred_fp32.parquet"), pq.read_table(work / "pred_int8.parquet")
    print("AUC on the test split   fp32     int8     delta")
    for task in a32:
        print(f"  {task:8s}            {a32[task]:.4f}   {a8[task]:.4f}   {a8[task] - a32[task]:+.4f}")
    diffs = {n: float(np.abs(p32.column(n).to_numpy() - p8.column(n).to_numpy()).max())
             for n in ("p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr")}
    print("max |p_int8 - p_fp32| over the test split: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    (work / "figures.json").write_text(json.dumps({"latency": lat, "auc_fp32": a32, "auc_int8": a8,
                                                   "max_abs_diff_int8": diffs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
