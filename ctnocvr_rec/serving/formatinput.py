"""Files of a ``data prepare`` input format -> batches of raw columns for ``ctnocvr predict --format NAME``.

The format's own reader does the reading (:data:`ctnocvr_rec.data.formats.FORMATS`: same options,
same parser, same reject reasons as ``data prepare``), so new files of the format a model was
trained on are scored without preparing them. Which files: the ones named by ONE of the format's
split options (``--train``, ``--valid`` or ``--test``; ``--split`` picks one when several are
given). The reader is handed a copy of the options naming only those files (as ``--train``, the
split every file format requires), so it checks exactly the files that are scored.

Rows are streamed chunk by chunk (memory flat). A row is rejected -- no prediction, listed in
``<out>.rejects.csv`` with ``file,row,reason,detail`` and counted by reason -- when the reader cannot
parse it, or (the rules of ``data prepare``'s writer, :func:`~ctnocvr_rec.data.writer.label_dense_rejects`)
when a label is not 0/1, ``click=0, conversion=1``, or a dense value is missing or not finite.
``sample_id`` is the running 0-based data-row index over the scored files in order, rejected rows
counted (``data prepare``'s rule: the same files prepared as the first split get the same ids).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np

from ctnocvr_rec.data.formats.base import InputSource, RawRows
from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.serving.contract import ServingContract
from ctnocvr_rec.serving.rawinput import RawBatch, RawReport

SPLIT_OPTIONS = ("train", "valid", "test")


def open_for_scoring(format_name: str, args: argparse.Namespace, split: str | None) -> tuple[InputSource, str]:
    """Open the files of one split option of ``--format format_name`` (see the module docstring).

    Returns the source (its ``"train"`` split = the files to score) and a description of the input.
    Raises ``ValueError`` naming the options on an unusable choice.
    """
    from ctnocvr_rec.data.formats import FORMATS

    fmt = FORMATS.get(format_name)
    if fmt is None:
        raise ValueError(f"--format {format_name}: unknown; formats: {', '.join(FORMATS)}")
    if not hasattr(fmt, "open") or hasattr(fmt, "prepare"):
        raise ValueError(f"--format {format_name}: score its files with --raw-dir DIR (this format has its own "
                         "pipeline, not a row reader)")
    given = [s for s in SPLIT_OPTIONS if getattr(args, s, None)]
    if not given:
        raise ValueError(f"--format {format_name} needs the files to score: --test FILE... (or --train / --valid)")
    if split is None:
        if len(given) > 1:
            raise ValueError(f"--format {format_name}: files given for {', '.join('--' + s for s in given)}; "
                             "say which to score with --split")
        split = given[0]
    if split not in given:
        raise ValueError(f"--split {split}: no --{split} files given (given: {', '.join('--' + s for s in given)})")
    only = argparse.Namespace(**vars(args))
    for s in SPLIT_OPTIONS:
        setattr(only, s, None)
    only.train = getattr(args, split)
    from ctnocvr_rec.data.formats.base import PrepareError

    try:
        source = fmt.open(only)
    except PrepareError as e:
        raise ValueError(str(e).replace("--train", f"--{split}") if split != "train" else str(e)) from None
    return source, f"--format {format_name} --{split} {' '.join(map(str, getattr(args, split)))}"


def check_schema_matches(contract: ServingContract, schema: FieldSchema, where: str) -> None:
    """Refuse an input whose fields or dense features are not the model's (``ValueError`` says what differs)."""
    problems = []
    mine, model = set(schema.names), set(contract.field_names)
    if mine != model:
        problems.append(f"sparse fields: the input lacks {sorted(model - mine)}, has extra {sorted(mine - model)}")
    for spec in schema:
        if spec.name in model and spec.weighted != contract.feature(spec.name).weights_from_input:
            problems.append(f"field {spec.name}: weighted={spec.weighted} in the input schema, "
                            f"{contract.feature(spec.name).weights_from_input} in the model")
    dense_in = {d.name: d for d in schema.dense}
    dense_model = {d.name: d for d in contract.dense}
    if set(dense_in) != set(dense_model):
        problems.append(f"dense features: the input lacks {sorted(set(dense_model) - set(dense_in))}, "
                        f"has extra {sorted(set(dense_in) - set(dense_model))}")
    for name in sorted(set(dense_in) & set(dense_model)):
        a, b = dense_in[name], dense_model[name]
        if (a.transform, a.standardize) != (b.transform, b.standardize):
            problems.append(f"dense feature {name}: transform={a.transform}, standardize={a.standardize} in the "
                            f"input schema, transform={b.transform}, standardize={b.standardize} in the model")
    if problems:
        raise ValueError(f"{where}: its schema ({schema.source or 'format default'}) is not the model's "
                         f"({contract.folder}/serving.json): " + "; ".join(problems)
                         + " (pass the schema the model was trained with: --schema / --table-schema)")


def _take(chunk: RawRows, keep: np.ndarray) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                                                     dict[str, np.ndarray]]:
    """Rows ``keep`` of ``chunk`` as scorer columns ``{field: (ids, lengths, weights)}`` and dense ``{name: [B]}``."""
    from ctnocvr_rec.data.csr import csr_gather_index

    columns = {}
    for name, values in chunk.sparse.items():
        offsets, index = csr_gather_index(np.asarray(values.offsets, np.int64), keep)
        ids = np.asarray(values.ids, np.int64)[index]
        weights = None if values.weights is None else np.asarray(values.weights, np.float32)[index]
        columns[name] = (ids, np.diff(offsets).astype(np.int64), weights)
    dense = {name: np.asarray(v, np.float64)[keep] for name, v in chunk.dense.items()}
    return columns, dense


def iter_format_batches(source: InputSource, batch_size: int, report: RawReport) -> Iterator[RawBatch]:
    """Accepted rows of the source's scored files in input order, ``batch_size`` at a time (raw ids,
    raw dense values); ``report`` collects rows and rejects ``(file, row, reason, detail)``."""
    from ctnocvr_rec.data.writer import label_dense_rejects

    base, current, last_row = 0, None, 0
    for chunk in source.read("train"):
        if chunk.file != current:  # a new file: its rows continue the running index
            base += last_row
            current, last_row = chunk.file, 0
        bad, rejects = label_dense_rejects(chunk, source.schema)
        rejects = list(chunk.rejects) + rejects
        report.rejects += [(r.file, r.row, r.reason, r.detail) for r in rejects]
        report.rows_in += len(chunk) + len(chunk.rejects)
        last_row = max([last_row, int(np.max(chunk.rows)) if len(chunk) else 0] + [r.row for r in rejects])
        keep = np.flatnonzero(~bad)
        report.rows_read += len(keep)
        for lo in range(0, len(keep), batch_size):
            rows = keep[lo:lo + batch_size]
            columns, dense = _take(chunk, rows)
            yield RawBatch(base + np.asarray(chunk.rows, np.int64)[rows] - 1,
                           np.asarray(chunk.click, np.int8)[rows], np.asarray(chunk.conversion, np.int8)[rows],
                           columns, dense)

