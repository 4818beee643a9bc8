"""``ctnocvr export``: a checkpoint of a run (saved on any number of ranks) -> a self-contained folder.

Steps: the run's ``config.yaml`` and prepared set give the schema and table sizes; the ranker is
built unsharded on CPU and the checkpoint's model weights are loaded into it
(:func:`ctnocvr_rec.train.checkpoint.load_model_weights`: DCP reshards whatever plan and world size
wrote them). Then the float program, the int8 program and optionally the AOTInductor package are
built (:mod:`ctnocvr_rec.serving.program`), each is run against the eager ranker on check inputs
(batch 1, the export example's batch and a larger one) and its max abs difference recorded in
``serving.json``; the float program must agree to :data:`FLOAT_TOLERANCE` or the export fails.
The vocabularies of the prepared set are copied in, and every file's size and sha256 recorded.

The folder is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ctnocvr_rec.serving.contract import (
    CONTRACT_FILE,
    FORMAT,
    OUTPUTS,
    PROGRAM_FILES,
    VOCAB_DIR,
    program_inputs,
    sha256_file,
)
from ctnocvr_rec.serving.program import (
    compile_aot,
    example_inputs,
    export_float,
    num_dense_of,
    quantize_int8,
    serving_program,
    sparse_arch_of,
)

#: the float program must equal the eager ranker to this (max abs difference of probabilities)
FLOAT_TOLERANCE = 1e-5
#: example batch traced by torch.export (the check inputs include batch 1 and a larger batch)
EXAMPLE_BATCH = 8
CHECK_BATCHES = (1, EXAMPLE_BATCH, 301)


def git_identity(root: Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the code doing the export (``"unknown"`` outside a git checkout)."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        return {"commit": rev or "unknown", "dirty": bool(status) if rev else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def load_run_model(run_dir: str | Path, checkpoint: str | Path | None = None,
                   overrides: list[str] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's ranker, unsharded on CPU, with the weights of ``checkpoint`` (default: the newest).

    Returns ``(model in eval mode, info)``; ``info`` holds the config, schema, table sizes and the
    checkpoint's path, step and saved world size.
    """
    from ctnocvr_rec.config import to_dict
    from ctnocvr_rec.data.prepared import PreparedSet
    from ctnocvr_rec.models import build_model
    from ctnocvr_rec.resources import resolve
    from ctnocvr_rec.train import checkpoint as ckpt
    from ctnocvr_rec.train.api import open_run_checkpoint

    run_dir = Path(run_dir)
    # verified: a damaged newest checkpoint is skipped (and reported); a damaged named one is refused
    cfg, info = open_run_checkpoint(run_dir, checkpoint, overrides)
    prepared = Path(cfg.data.prepared_dir)
    # the schema the run trained with ("" = the manifest's); the manifest's copy when the config's
    # path is relative to another working directory
    schema_ref = cfg.data.schema
    if schema_ref:
        try:
            resolve("fields", schema_ref)
        except FileNotFoundError:
            schema_ref = ""
    prepared_set = PreparedSet.open(prepared, schema_ref)
    schema = prepared_set.schema
    prepared_set.table_sizes()  # every schema field has a size, else an error naming the manifest
    num_embeddings = prepared_set.num_embeddings
    model = build_model(cfg.model, schema, num_embeddings, device=torch.device("cpu"))
    ckpt.load_model_weights(info.path, model, verify=False)  # verified just above
    model.eval()
    return model, {
        "config": to_dict(cfg),
        "schema": schema,
        "num_embeddings": num_embeddings,
        "prepared_dir": prepared,
        "checkpoint": info.path,
        "step": int(info.meta.get("step", info.step)),
        "saved_world_size": int(info.meta.get("world_size", 0)),
        "dense_stats": prepared_set.dense_stats(),
    }


def _max_abs_diff(program: Callable[..., torch.Tensor], reference: torch.nn.Module,
                  checks: list[tuple[torch.Tensor, ...]]) -> float:
    with torch.no_grad():
        return max(float((program(*x) - reference(*x)).abs().max()) for x in checks)


def _features_contract(schema: Any, model: torch.nn.Module, prepared: Path, out: Path) -> list[dict[str, Any]]:
    """``serving.json["features"]``, copying the vocabulary files of vocab-mapped fields into ``out``."""
    import pyarrow.parquet as pq

    arch = sparse_arch_of(model)
    rows = {f: cfg.num_embeddings for ebc in (arch.embedding_bag_collection, arch.weighted_embedding_bag_collection)
            if ebc is not None for cfg in ebc.embedding_bag_configs() for f in cfg.feature_names}
    weighted_keys = set(arch.weighted_feature_names)
    vocab_src = prepared / VOCAB_DIR
    has_vocab = vocab_src.is_dir() and all(
        (vocab_src / f"{s.name}.parquet").is_file() for s in schema if s.mapping == "vocab")
    features = []
    for spec in schema:  # schema order = the order of the dict inputs and of each program group
        entry: dict[str, Any] = {
            "field": spec.name, "feature": spec.feature_name, "group": spec.group,
            "weighted": spec.feature_name in weighted_keys,
            "weights_from_input": bool(spec.weighted), "mapping": spec.mapping,
            "num_embeddings": int(rows[spec.feature_name]), "num_buckets": int(spec.num_buckets), "vocab_file": "",
        }
        if spec.mapping == "vocab":
            if not has_vocab:
                entry["mapping"] = "none"
            else:
                rel = f"{VOCAB_DIR}/{spec.name}.parquet"
                (out / VOCAB_DIR).mkdir(exist_ok=True)
                shutil.copyfile(vocab_src / f"{spec.name}.parquet", out / rel)
                top = pq.read_table(out / rel, columns=["mapped_id"]).column("mapped_id").to_numpy()
                if len(top) and int(top.max()) >= entry["num_embeddings"]:
                    raise ValueError(f"{vocab_src}/{spec.name}.parquet maps to row {int(top.max())} but table "
                                     f"of field {spec.name} has {entry['num_embeddings']} rows (another prepared set?)")
                entry["vocab_file"] = rel
        features.append(entry)
    return features


def _dense_contract(schema: Any, dense_stats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``serving.json["dense_features"]``: per dense feature (program column order) the transform and
    the fitted stats of the prepared set (``manifest["dense_stats"]``), what raw values go through."""
    return [{"name": d.name, "column": d.column, "transform": d.transform, "standardize": bool(d.standardize),
             "mean": float(dense_stats[d.name]["mean"]), "std": float(dense_stats[d.name]["std"])}
            for d in schema.dense]


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None, aot: bool = False,
               int8: bool = True, overrides: list[str] | None = None, force: bool = False,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the artifact folder ``out`` (see the module docstring); returns its ``serving.json``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / CONTRACT_FILE).is_file():
            raise ValueError(f"{out}: exists, is not empty and is not an export folder; not overwriting it")
        if not force:
            raise ValueError(f"{out}: already holds an export (--force replaces it)")
    started = time.perf_counter()
    model, info = load_run_model(run_dir, checkpoint, overrides)
    log(f"[export] {info['checkpoint']} (step {info['step']}, saved on {info['saved_world_size']} rank(s)), "
        f"{info['config']['model']['arch']} with {sum(p.numel() for p in model.parameters()):,} parameters")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        reference = serving_program(model).eval()
        example = example_inputs(model, EXAMPLE_BATCH, seed=0)
        checks = [example_inputs(model, b, seed=100 + b) for b in CHECK_BATCHES]
        programs: dict[str, dict[str, Any]] = {}

        t = time.perf_counter()
        exported = export_float(model, example)
        torch.export.save(exported, str(tmp / PROGRAM_FILES["fp32"]))
        loaded = torch.export.load(str(tmp / PROGRAM_FILES["fp32"])).module()
        diff = _max_abs_diff(loaded, reference, checks)
        if not diff <= FLOAT_TOLERANCE:
            raise RuntimeError(f"the exported float program differs from the ranker by {diff:.3g} "
                               f"(> {FLOAT_TOLERANCE}); not writing {out}")
        programs["fp32"] = {"file": PROGRAM_FILES["fp32"], "kind": "torch.export", "build_s": time.perf_counter() - t,
                            "max_abs_diff_vs_ranker": diff}
        log(f"[export] fp32 program (torch.export): max |diff| vs the ranker {diff:.2e}, "
            f"{programs['fp32']['build_s']:.1f}s")
        if int8:
            t = time.perf_counter()
            scripted = quantize_int8(model)
            torch.jit.save(scripted, str(tmp / PROGRAM_FILES["int8"]))
            diff = _max_abs_diff(torch.jit.load(str(tmp / PROGRAM_FILES["int8"])), reference, checks)
            programs["int8"] = {"file": PROGRAM_FILES["int8"], "kind": "torchscript (fx trace), row-wise int8 tables",
                                "build_s": time.perf_counter() - t, "max_abs_diff_vs_ranker": diff}
            log(f"[export] int8 program (TorchScript): max |diff| vs the ranker {diff:.2e}, "
                f"{programs['int8']['build_s']:.1f}s")
        if aot:
            log("[export] compiling the AOTInductor package (minutes on a small CPU)...")
            seconds = compile_aot(exported, tmp / PROGRAM_FILES["aot"])
            package = torch._inductor.aoti_load_package(str(tmp / PROGRAM_FILES["aot"]))
            diff = _max_abs_diff(package, reference, checks)
            programs["aot"] = {"file": PROGRAM_FILES["aot"], "kind": "AOTInductor package (cpu)",
                               "build_s": seconds, "max_abs_diff_vs_ranker": diff}
            log(f"[export] aot package: max |diff| vs the ranker {diff:.2e}, compiled in {seconds:.1f}s")

        features = _features_contract(info["schema"], model, info["prepared_dir"], tmp)
        import fbgemm_gpu
        import torchrec

        cfg = info["config"]
        run_metrics = Path(run_dir) / "metrics.json"
        contract = {
            "format": FORMAT,
            "features": features,
            "dense_features": _dense_contract(info["schema"], info["dense_stats"]),
            "oov_rule": "vocab fields: a raw id absent from vocab/<field>.parquet (or kept out by min_count) "
                        "maps to row 0; hash fields: raw_id mod num_buckets",
            "program_inputs": program_inputs(num_dense_of(model) > 0),
            "outputs": list(OUTPUTS),
            "programs": programs,
            "export_example_batch": EXAMPLE_BATCH,
            "check_batches": list(CHECK_BATCHES),
            "float_tolerance": FLOAT_TOLERANCE,
            "model": {"arch": cfg["model"]["arch"], "use_ctnocvr": cfg["model"]["use_ctnocvr"],
                      "config": cfg["model"]},
            "run": {"run_dir": str(Path(run_dir).resolve()), "checkpoint": str(Path(info["checkpoint"]).resolve()),
                    "step": info["step"], "saved_world_size": info["saved_world_size"],
                    "prepared_dir": str(info["prepared_dir"].resolve()),
                    "trained_git_rev": (json.loads(run_metrics.read_text()).get("git_rev", "unknown")
                                        if run_metrics.is_file() else "unknown")},
            "git": git_identity(),
            "exported_with": {"torch": torch.__version__, "torchrec": getattr(torchrec, "__version__", "?"),
                              "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
                              "python": platform.python_version(), "machine": platform.machine()},
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {},
        }
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            contract["files"][rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        (tmp / CONTRACT_FILE).write_text(json.dumps(contract, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = ", ".join(f"{k} {contract['files'][v['file']]['bytes'] / 1e6:.2f} MB" for k, v in programs.items())
    log(f"[export] wrote {out} ({sizes}) in {time.perf_counter() - started:.1f}s")
    return contract
