"""``ctnocvr predict``: score a prepared split, raw Ali-CCP files or files of a ``data prepare`` format
with an exported model, streaming.

Input is read in batches (a prepared split through :class:`~ctnocvr_rec.data.dataset.
ParquetBatchDataset`, file order; raw files through :mod:`ctnocvr_rec.serving.rawinput`; files of
an input format, ``--format NAME``, through that format's reader, :mod:`ctnocvr_rec.serving.formatinput`), scored by
the :class:`~ctnocvr_rec.serving.scorer.Scorer` and written with ``pyarrow.parquet.ParquetWriter``
one row group at a time, so memory stays flat whatever the input size (raw input also holds its
common-features table, as ``data prepare`` does).

Output columns: ``sample_id`` (int64), ``p_ctr, p_cvr, p_ctcvr, p_ctnocvr`` (float32) and, when the
input has labels, ``click, conversion`` (int8).

A prepared split must have been mapped with the exported vocabularies: their sha256 are compared
with ``serving.json`` (a set prepared without vocabularies is checked by table sizes only). Raw ids
are mapped through the exported vocabularies (raw dense values, where a raw format has them, through the
exported transform, ``data/dense.py``); ids never seen in training go to the OOV row and are
counted per field in the summary; rejected raw lines are written next to the output
(``<out>.rejects.csv``: file, line, reason, detail).
"""

from __future__ import annotations

import csv
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctnocvr_rec.serving.contract import ServingContract, sha256_file
from ctnocvr_rec.serving.scorer import Encoded, Scorer

ROW_GROUP_ROWS = 65_536


class PredictionWriter:
    """Appends scored batches to a Parquet file, one row group per ``row_group_rows`` rows."""

    def __init__(self, path: str | Path, outputs: tuple[str, ...], labels: bool,
                 row_group_rows: int = ROW_GROUP_ROWS) -> None:
        fields = [pa.field("sample_id", pa.int64())] + [pa.field(n, pa.float32()) for n in outputs]
        if labels:
            fields += [pa.field("click", pa.int8()), pa.field("conversion", pa.int8())]
        self.schema = pa.schema(fields)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.writer = pq.ParquetWriter(str(self.tmp), self.schema)
        self.row_group_rows = row_group_rows
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.rows = 0

    def write(self, columns: dict[str, np.ndarray]) -> None:
        batch = pa.record_batch([pa.array(columns[f.name], f.type) for f in self.schema], schema=self.schema)
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        self.rows += batch.num_rows
        if self.pending_rows >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_batches(self.pending), row_group_size=self.pending_rows)
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        """Finish the file and move it into place (an interrupted run leaves no partial output)."""
        self._flush()
        self.writer.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def check_prepared_matches(contract: ServingContract, prepared: Path) -> str:
    """Refuse a prepared set whose ids were mapped by other vocabularies, or whose dense values were
    transformed with other stats; returns how it was checked."""
    from ctnocvr_rec.data.prepared import PreparedSet

    prepared_set = PreparedSet.open(prepared)
    sizes = prepared_set.num_embeddings
    stats = prepared_set.manifest.get("dense_stats") or {}
    for d in contract.dense:
        mine = stats.get(d.name)
        if not isinstance(mine, dict) or (float(mine.get("mean", "nan")), float(mine.get("std", "nan"))) != (d.mean, d.std):
            raise ValueError(f"{prepared}/manifest.json: dense feature {d.name} has stats {mine}, the model's "
                             f"mean {d.mean}, std {d.std}: its values were transformed otherwise (another prepared set?)")
    checked = 0
    for f in contract.features:
        if f.mapping == "vocab":
            mine = prepared / "vocab" / f"{f.field}.parquet"
            if not mine.is_file():
                raise ValueError(f"{prepared}: no vocab/{f.field}.parquet; the model maps field {f.field} through "
                                 "its vocabulary, so this set was not prepared like its training data")
            if sha256_file(mine) != contract.tree["files"][f.vocab_file]["sha256"]:
                raise ValueError(f"{mine}: differs from the model's {f.vocab_file}: this set's ids were mapped by "
                                 "another vocabulary (score its raw files with --raw-dir instead)")
            checked += 1
        elif f.field in sizes and int(sizes[f.field]) > f.num_embeddings:
            raise ValueError(f"{prepared}/manifest.json: field {f.field} has {sizes[f.field]} rows, the model's "
                             f"table {f.num_embeddings}: prepared with another vocabulary")
    return f"{checked} vocabularies equal the model's" if checked else "table sizes only (no vocabularies)"


def _prepared_batches(scorer: Scorer, prepared: Path, split: str, batch_size: int
                      ) -> tuple[Iterator[tuple[Encoded, dict[str, np.ndarray]]], int]:
    from ctnocvr_rec.data.dataset import ParquetBatchDataset

    dataset = ParquetBatchDataset(prepared, split, batch_size)
    total = dataset.num_rows

    def gen() -> Iterator[tuple[Encoded, dict[str, np.ndarray]]]:
        for batch in dataset:
            # a prepared set stores dense values transformed: they go in as they are
            encoded = scorer.encode(batch.sparse_features, batch.weighted_features, ids="mapped", dense=batch.dense,
                                    dense_values="transformed")
            yield encoded, {"sample_id": batch.sample_id.numpy(), "click": batch.click.numpy().astype(np.int8),
                            "conversion": batch.conversion.numpy().astype(np.int8)}

    return gen(), total


def predict(model_dir: str | Path, out: str | Path, precision: str = "fp32", prepared: str | Path | None = None,
            split: str = "test", raw_dir: str | Path | None = None, batch_size: int = 1024,
            progress: bool = True, scorer: Scorer | None = None, source: Any = None,
            source_desc: str = "") -> dict[str, Any]:
    """Score the input into ``out`` (Parquet); returns the summary (rows, rows/s, OOV, rejects).

    Input: ``prepared`` (+ ``split``), ``raw_dir`` (+ ``split``), or ``source``: an opened input of a
    ``data prepare`` format whose ``"train"`` split holds the files to score
    (:func:`ctnocvr_rec.serving.formatinput.open_for_scoring`; ``source_desc`` names it in the summary).
    ``scorer``: an already loaded :class:`Scorer` of ``model_dir`` (skips loading; its precision wins).
    """
    if sum(x is not None for x in (prepared, raw_dir, source)) != 1:
        raise ValueError("give exactly one input: --prepared DIR (with --split), --raw-dir DIR or --format NAME "
                         "with its files")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    if source is not None:  # a schema mismatch is refused before the program is loaded (seconds)
        from ctnocvr_rec.serving.formatinput import check_schema_matches

        check_schema_matches(scorer.contract if scorer else ServingContract.load(model_dir), source.schema,
                             source_desc or "input files")
    scorer = scorer or Scorer.load(model_dir, precision=precision)
    load_s = time.perf_counter() - started
    precision = scorer.precision
    contract = scorer.contract
    summary: dict[str, Any] = {"model": str(model_dir), "precision": precision, "out": str(out), "load_s": load_s}
    report = None
    if prepared is not None:
        summary["input"] = f"{prepared} split {split}"
        summary["prepared_check"] = check_prepared_matches(contract, Path(prepared))
        batches, total = _prepared_batches(scorer, Path(prepared), split, batch_size)
        unit, advance = "rows", None
    elif source is not None:
        from ctnocvr_rec.serving.formatinput import iter_format_batches
        from ctnocvr_rec.serving.rawinput import RawReport

        summary["input"] = source_desc or "input files"  # its schema was checked above
        report = RawReport()
        total, unit, advance = 0, "rows", None

        def format_gen() -> Iterator[tuple[Encoded, dict[str, np.ndarray]]]:
            for rb in iter_format_batches(source, batch_size, report):
                # raw ids through the exported vocabularies / hash, raw dense values through the exported
                # transform (rows with non-finite values were rejected before)
                yield scorer.encode_columns(rb.columns, rb.batch_size, ids="raw", dense=rb.dense or None,
                                            dense_values="raw"), {
                    "sample_id": rb.sample_id, "click": rb.click, "conversion": rb.conversion}

        batches = format_gen()
    else:
        from ctnocvr_rec.serving.rawinput import RawReport, iter_raw_batches, skeleton_bytes

        summary["input"] = f"{raw_dir} split {split} (raw files)"
        if contract.dense:
            raise ValueError(
                f"{model_dir}: the model has dense features {contract.dense_names}, which the official Ali-CCP raw "
                "format (--raw-dir) does not carry; score a prepared set (--prepared) or call Scorer with the raw "
                "values (they get the exported transform)")
        report = RawReport()
        user = [(f.field, f.weights_from_input) for f in contract.features if f.group == "user"]
        other = [(f.field, f.weights_from_input) for f in contract.features if f.group != "user"]
        total, unit = skeleton_bytes(raw_dir, split), "B"
        bar_ref: list[Any] = []

        def advance(n: int) -> None:
            if bar_ref:
                bar_ref[0].update(n)

        def raw_gen() -> Iterator[tuple[Encoded, dict[str, np.ndarray]]]:
            for rb in iter_raw_batches(raw_dir, split, user, other, batch_size, report, on_bytes=advance):
                # raw dense values (if the format has any) get the exported transform (data/dense.py)
                yield scorer.encode_columns(rb.columns, rb.batch_size, ids="raw", dense=rb.dense or None,
                                            dense_values="raw"), {
                    "sample_id": rb.sample_id, "click": rb.click, "conversion": rb.conversion}

        batches = raw_gen()
    from tqdm import tqdm

    bar = tqdm(total=total or None, unit=unit, unit_scale=unit == "B", desc=f"predict {precision}",
               file=sys.stderr, disable=not progress, leave=False)
    if advance is not None:
        bar_ref.append(bar)
    writer = PredictionWriter(out, contract.outputs, labels=True)
    ids, unseen, oov = Counter(), Counter(), Counter()
    score_s = 0.0
    try:
        for encoded, extra in batches:
            t = time.perf_counter()
            probabilities = scorer.score_encoded(encoded)
            score_s += time.perf_counter() - t
            writer.write({**extra, **{k: v.numpy() for k, v in probabilities.items()}})
            ids.update(encoded.ids)
            unseen.update(encoded.unseen)
            oov.update(encoded.oov)
            if advance is None:
                bar.update(encoded.batch_size)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - started
    stream = wall - load_s
    summary.update({"rows": writer.rows, "wall_s": wall, "rows_per_s": writer.rows / max(stream, 1e-9),
                    "score_s": score_s, "ids": sum(ids.values())})
    if report is not None:
        summary.update({"unseen_ids": sum(unseen.values()), "oov_ids": sum(oov.values()),
                        "unseen_by_field": {k: v for k, v in unseen.items() if v},
                        "rows_in": report.rows_in, "rows_rejected": report.rows_in - report.rows_read,
                        "rejects_by_reason": report.by_reason()})
        if report.rejects:
            path = Path(out).with_name(Path(out).name + ".rejects.csv")
            with open(path, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                # raw Ali-CCP files: physical line; --format input: data row (as data prepare's rejects.csv)
                w.writerow(["file", "row" if source is not None else "line", "reason", "detail"])
                w.writerows(sorted(report.rejects, key=lambda r: (r[0], r[1])))
            summary["rejects_file"] = str(path)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"scored {s['rows']:,} rows of {s['input']} with {s['precision']} -> {s['out']}",
             f"  {s['wall_s']:.1f}s ({s['load_s']:.1f}s loading the program), {s['rows_per_s']:,.0f} rows/s "
             f"read+map+score+write ({s['rows'] / max(s['score_s'], 1e-9):,.0f} rows/s in the program)"]
    if "prepared_check" in s:
        lines.append(f"  prepared set checked: {s['prepared_check']}")
    if "unseen_ids" in s:
        share = s["unseen_ids"] / max(s["ids"], 1)
        lines.append(f"  ids never seen in training (-> OOV row 0): {s['unseen_ids']:,} of {s['ids']:,} ({share:.2%}); "
                     f"all OOV ids incl. below min_count: {s['oov_ids']:,}")
        if s["unseen_by_field"]:
            worst = sorted(s["unseen_by_field"].items(), key=lambda kv: -kv[1])[:6]
            lines.append("  unseen by field: " + ", ".join(f"{k} {v:,}" for k, v in worst))
        lines.append(f"  raw rows_in {s['rows_in']:,} = scored {s['rows']:,} + rejected {s['rows_rejected']:,}"
                     + (f" ({', '.join(f'{k} {v}' for k, v in s['rejects_by_reason'].items())}; "
                        f"{s['rejects_file']})" if s.get("rejects_file") else ""))
    return "\n".join(lines)
