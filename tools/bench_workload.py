"""The ids a training benchmark feeds (tools/bench_train.py): Ali-CCP-shaped or today's uniform ids.

Two workloads, each a JSON-able dict so that every benchmark process (torchrun ranks, side
processes) rebuilds the same batches from it:

* ``aliccp`` (default): the Ali-CCP field schema of a prepared set; table sizes of the
  ``aliccp-full`` plan preset (``ctnocvr_rec/presets/aliccp_full.yaml``: published user/item counts,
  estimated other fields, 9.2 M rows in all); per field, ids drawn from a Zipf law whose exponent is
  fitted (maximum likelihood, ``ctnocvr_rec.data.id_skew``) on the id counts of a prepared set, hot
  ids scattered over the table by a random permutation; per field, list lengths drawn from the
  length distribution of that prepared set (the weighted 14-day histories ``109_14, 110_14, 127_14,
  150_14`` with their lists, ``210`` multi-valued, absent fields as empty lists) with history weights
  drawn like ``log(1 + count)``. By default the prepared set is a 1/200-scale full-shape one
  (``tools/make_fullshape.py`` + ``ctnocvr data prepare``, made once in
  ``artifacts/bench-fit-fullshape``): Ali-CCP's list lengths (~528 ids per row, 509 of them history
  ids), with the ids' Zipf exponent that tool draws (1.05), so the fits report ~1.0. ``synth``
  (``artifacts/bench-fit``, ``ctnocvr data synth``) fits the learning generator instead: its
  ~30-item histories give ~87 ids per row, the workload of the figures before 2026-12-01.
* ``uniform``: today's benchmark: 23 single-id unweighted fields of 20,000 rows, ids uniform.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIELDS = 23
VOCAB = 20_000
FIT_ROWS = 200_000


def uniform_workload() -> dict[str, Any]:
    groups = ["user"] * 9 + ["item"] * 5 + ["combination"] * 4 + ["context"] * 5
    fields = [{"name": f"x{i}", "group": groups[i]} for i in range(FIELDS)]
    return {
        "kind": "uniform",
        "schema": {"fields": fields},
        "num_embeddings": {f"x{i}": VOCAB for i in range(FIELDS)},
        "profiles": {f"x{i}": {"exponent": 0.0, "distinct_ids": VOCAB - 1, "length_values": [1],
                               "length_probs": [1.0]} for i in range(FIELDS)},
        "scatter": False,
        "source": f"uniform ids over {VOCAB:,} rows, one id per field, 23 unweighted fields",
    }


#: the prepared sets a workload can be fitted on (``make_fit_set``): where each is made
FIT_SETS: dict[str, str] = {"fullshape": "bench-fit-fullshape", "synth": "bench-fit"}


def make_fit_set(artifacts: Path, kind: str = "fullshape") -> Path:
    """A prepared set to fit on, made once in ``artifacts/<FIT_SETS[kind]>`` and then reused.

    ``fullshape`` (default): ``tools/make_fullshape.py`` at 1/200 of real Ali-CCP (~211 k train rows,
    ~3.7 k requests): the real data's per-request shape, i.e. the four 14-day histories at ~509 ids
    per row in all (85 / 170 / 140 / 113) and ids Zipf(1.05) over the ``aliccp-full`` sizes.
    ``synth``: ``ctnocvr data synth`` (``FIT_ROWS`` rows), the learning-experiment generator: its
    histories hold ~30 items (~87 ids per row in all), far shorter than Ali-CCP's; the workload of
    this benchmark before 2026-12-01.
    """
    folder = artifacts / FIT_SETS[kind]
    prepared = folder / "prepared"
    if (prepared / "manifest.json").is_file():
        return prepared
    raw = folder / "raw"
    cli = [sys.executable, "-m", "ctnocvr_rec.cli", "data"]
    make = ([sys.executable, str(REPO / "tools" / "make_fullshape.py"), "--out", str(raw), "--scale", "0.005",
             "--test-scale", "0.0002"] if kind == "fullshape" else
            cli + ["synth", "--out", str(raw), "--rows-train", str(FIT_ROWS), "--rows-test", "2000"])
    for cmd in (make, cli + ["prepare", "--raw-dir", str(raw), "--out", str(prepared), "--no-progress"]):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"making the {kind} fit set failed: {' '.join(cmd[:4])}\n{proc.stderr[-3000:]}")
    return prepared


def add_fit_arguments(parser: Any) -> None:
    """``--fit-set`` / ``--fit-on``: the prepared set the Ali-CCP-shaped workload is fitted on."""
    parser.add_argument("--fit-set", choices=list(FIT_SETS), default="fullshape",
                        help="made once under artifacts/: fullshape (default; Ali-CCP's list lengths) or synth "
                        "(the learning generator's short histories, the figures before 2026-12-01)")
    parser.add_argument("--fit-on", help="a prepared set of your own to fit on instead of --fit-set")


def fit_prepared(args: Any) -> Path:
    """The prepared set ``--fit-on`` names, else the ``--fit-set`` one (made if missing)."""
    return Path(args.fit_on) if args.fit_on else make_fit_set(REPO / "artifacts", args.fit_set)


def aliccp_workload(prepared: Path, preset: str = "aliccp-full", exponent: float | None = None,
                    scatter: bool = True) -> dict[str, Any]:
    """The Ali-CCP-shaped workload: schema and profiles of ``prepared``, sizes of ``preset``."""
    from ctnocvr_rec.data.id_skew import profile_prepared
    from ctnocvr_rec.data.prepared import read_manifest
    from ctnocvr_rec.plan.tables import load_preset

    schema = read_manifest(prepared)["schema"]
    names = [f["name"] for f in schema["fields"]]
    sizes = load_preset(preset).num_embeddings
    missing = [n for n in names if n not in sizes]
    if missing:
        raise SystemExit(f"preset {preset} has no size for field(s) {missing} of {prepared}")
    profiles = {k: v.to_dict() for k, v in profile_prepared(prepared, names).items()}
    if exponent is not None:
        for p in profiles.values():
            p["exponent"] = exponent
    return {
        "kind": "aliccp",
        "schema": schema,
        "num_embeddings": {n: sizes[n] for n in names},
        "profiles": profiles,
        "scatter": scatter,
        "source": f"table sizes: preset {preset}; Zipf exponents and list lengths fitted on {prepared}"
                  + (f" (exponent overridden: {exponent})" if exponent is not None else ""),
    }


@dataclass
class RawBatch:
    """One batch, per field ``(offsets [B + 1] int64, ids [nnz] int64, weights [nnz] float32 | None)``."""

    fields: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    click: np.ndarray
    conversion: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.click)


def make_batches(workload: dict[str, Any], count: int, batch: int, seed: int) -> list[RawBatch]:
    """``count`` batches of ``batch`` rows drawn from ``workload`` (deterministic in ``seed``)."""
    from ctnocvr_rec.data.id_skew import FieldProfile, ZipfIds

    rng = np.random.default_rng(seed)
    weighted = {f["name"] for f in workload["schema"]["fields"] if f.get("weighted")}
    samplers = {}
    for k, (name, p) in enumerate(workload["profiles"].items()):
        prof = FieldProfile.from_dict(p)
        # the permutation's seed is fixed per field: every rank and process sees the same hot rows
        samplers[name] = (prof, ZipfIds(workload["num_embeddings"][name], prof.exponent, seed=1000 + k,
                                        scatter=bool(workload["scatter"])))
    out = []
    for _ in range(count):
        fields = {}
        for name, (prof, ids) in samplers.items():
            lengths = rng.choice(prof.length_values, size=batch, p=prof.length_probs).astype(np.int64)
            offsets = np.zeros(batch + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            values = ids.sample(int(offsets[-1]), rng)
            # history weights are log(1 + count) of a small count, as the synthetic generator writes
            w = np.log1p(rng.integers(1, 6, int(offsets[-1]))).astype(np.float32) if name in weighted else None
            fields[name] = (offsets, values, w)
        click = (rng.random(batch) < 0.3).astype(np.float32)
        conversion = click * (rng.random(batch) < 0.3).astype(np.float32)
        out.append(RawBatch(fields, click, conversion))
    return out


def to_table(raw: RawBatch, workload: dict[str, Any]):
    """The batch as a prepared-split Arrow table (the loader's own input format)."""
    import pyarrow as pa

    n = raw.rows
    cols: dict[str, Any] = {
        "sample_id": pa.array(np.arange(n, dtype=np.int64)),
        "request_id": pa.array(np.arange(n, dtype=np.int64)),
        "user_id": pa.array(np.full(n, -1, dtype=np.int64)),
        "click": pa.array(raw.click.astype(np.int8)),
        "conversion": pa.array(raw.conversion.astype(np.int8)),
    }
    for f in workload["schema"]["fields"]:
        offsets, ids, w = raw.fields[f["name"]]
        off = pa.array(offsets.astype(np.int32))
        cols[f["name"]] = pa.ListArray.from_arrays(off, pa.array(ids.astype(np.int32)))
        if f.get("weighted"):
            cols[f"{f['name']}__w"] = pa.ListArray.from_arrays(off, pa.array(w))
    return pa.table(cols)


def describe(workload: dict[str, Any]) -> str:
    """A few lines: where the workload comes from, per field size, exponent and mean list length."""
    lines = [f"workload {workload['kind']}: {workload['source']}"
             + ("; hot ids scattered over each table" if workload["scatter"] else "")]
    if workload["kind"] == "uniform":
        return lines[0]
    from ctnocvr_rec.data.id_skew import FieldProfile

    cells = []
    for name, p in workload["profiles"].items():
        prof = FieldProfile.from_dict(p)
        cells.append(f"{name}: {workload['num_embeddings'][name]:,} rows, s={prof.exponent:.2f}, "
                     f"len {prof.mean_length:.2f}")
    lines += ["  " + "; ".join(cells[i:i + 4]) for i in range(0, len(cells), 4)]
    total = sum(FieldProfile.from_dict(p).mean_length for p in workload["profiles"].values())
    lines.append(f"  ids per row: {total:.1f} (all fields), tables: {sum(workload['num_embeddings'].values()):,} rows")
    return "\n".join(lines)
