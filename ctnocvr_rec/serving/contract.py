"""``serving.json``: the input/output contract of an exported model folder, and raw-id mapping.

An artifact folder written by ``ctnocvr export`` holds::

    serving.json        this contract (format ``ctnocvr-serving/1``)
    model_fp32.pt2      float program (``torch.export``; dynamic batch size and id counts)
    model_int8.pt       int8 program (row-wise int8 tables; torchrec.fx trace + TorchScript)
    model_aot.pt2       optional: AOTInductor package of the float program (``--aot``)
    vocab/<field>.parquet  raw id -> row vocabularies (``raw_id, count, mapped_id``) of vocab fields

Every program takes the same five tensors (``PROGRAM_INPUTS``), plus a sixth, ``dense``, when the
model has dense features (``serving.json["program_inputs"]`` lists them), and returns ``[B, 4]``
float32 with the columns ``OUTPUTS``::

    values            int64   [N]       ids of the unweighted fields, field-major: all ids of field 0
                                        (row 0, row 1, ...), then field 1, ... (``unweighted_features``)
    lengths           int32   [F, B]    ids per (field, row) of the unweighted fields
    weighted_values   int64   [Nw]      same for the fields of weighted tables (``weighted_features``)
    weighted_lengths  int32   [Fw, B]
    weights           float32 [Nw]      one weight per weighted id (1.0 for plain fields of such tables)
    dense             float32 [B, D]    only with dense features: their *transformed* values, in
                                        ``serving.json["dense_features"]`` order

This is a :class:`~torchrec.KeyedJaggedTensor`'s ``values / lengths / weights`` with the lengths
viewed as ``[keys, stride]``. A group without features (``F == 0``) is passed as ``values [0]``,
``lengths [0, 1]`` and is not read.

Id mapping (``serving.json["features"][i]["mapping"]``): ``vocab`` (raw id -> ``mapped_id`` of the
field's vocabulary file; an id not in it, or kept out by ``min_count``, -> the OOV row 0), ``hash``
(``raw_id mod num_buckets``) or ``none`` (the model was trained on a prepared set without
vocabularies: only already-mapped ids can be scored). Mapped ids must lie in ``[0, num_embeddings)``.

Dense features (``serving.json["dense_features"]``: ``name, column, transform, standardize, mean,
std`` each, from the prepared set's schema and ``dense_stats``): a raw value goes through
:func:`ctnocvr_rec.data.dense.transform_dense` with these settings, the function ``data prepare``
stored the training values with, so it reaches the model exactly as a training value did
(:meth:`ServingContract.dense_for_model`).

This module needs numpy and pyarrow only (no torch; from ``ctnocvr_rec`` only the numpy-only
``data/dense.py``, the one definition of the dense transform).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctnocvr_rec.data.dense import transform_dense

FORMAT = "ctnocvr-serving/1"
CONTRACT_FILE = "serving.json"
OUTPUTS: tuple[str, ...] = ("p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr")
PROGRAM_INPUTS: tuple[str, ...] = ("values", "lengths", "weighted_values", "weighted_lengths", "weights")
#: the sixth program input of a model with dense features
DENSE_INPUT = "dense"
PROGRAM_FILES = {"fp32": "model_fp32.pt2", "int8": "model_int8.pt", "aot": "model_aot.pt2"}
VOCAB_DIR = "vocab"
OOV_ID = 0  # the out-of-vocabulary row of every vocab-mapped table (same rule as data prepare)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ServingFeature:
    """One input field of the contract."""

    field: str  # Ali-CCP field name ("205"); the key of plain dict inputs
    feature: str  # KJT key ("f_205")
    group: str  # user | item | combination | context (user fields come from the common-features file)
    weighted: bool  # in the weighted group (its table is weighted)
    weights_from_input: bool  # the field carries its own weights (else 1.0)
    mapping: str  # vocab | hash | none
    num_embeddings: int
    num_buckets: int = 0
    vocab_file: str = ""  # relative to the artifact folder


@dataclass(frozen=True)
class ServingDense:
    """One dense input of the contract: the transform its raw values go through (``data/dense.py``)."""

    name: str  # the dense feature's name (the key of plain dict inputs)
    column: str  # its prepared-set column (``<name>__d``)
    transform: str  # none | log1p
    standardize: bool
    mean: float
    std: float


def program_inputs(has_dense: bool) -> list[str]:
    """Names of the program inputs, in call order (``serving.json["program_inputs"]``)."""
    return [*PROGRAM_INPUTS, DENSE_INPUT] if has_dense else list(PROGRAM_INPUTS)


class IdMapper:
    """Raw id -> row of one field, the rule of ``data prepare`` (vocab with OOV 0, or hash).

    ``map(raw)`` returns ``(mapped int64 [n], unseen int)``: ``unseen`` counts ids absent from the
    vocabulary (they go to OOV). Ids present but kept out by ``min_count`` are OOV too, not unseen.
    """

    def __init__(self, feature: ServingFeature, folder: str | Path) -> None:
        self.feature = feature
        self.raw_ids = np.zeros(0, np.int64)
        self.mapped = np.zeros(0, np.int64)
        if feature.mapping == "vocab":
            import pyarrow.parquet as pq

            table = pq.read_table(Path(folder) / feature.vocab_file, columns=["raw_id", "mapped_id"])
            raw = table.column("raw_id").to_numpy().astype(np.int64)
            order = np.argsort(raw, kind="stable")
            self.raw_ids = raw[order]
            self.mapped = table.column("mapped_id").to_numpy().astype(np.int64)[order]

    def map(self, raw: np.ndarray) -> tuple[np.ndarray, int]:
        raw = np.asarray(raw, dtype=np.int64)
        if self.feature.mapping == "hash":
            return np.mod(raw, self.feature.num_buckets), 0
        if self.feature.mapping != "vocab":
            raise ValueError(
                f"feature {self.feature.field!r}: the model was exported without a vocabulary (its prepared set "
                "had none), so raw ids cannot be mapped; pass mapped ids (ids='mapped')"
            )
        if len(self.raw_ids) == 0:
            return np.full(raw.shape, OOV_ID, np.int64), int(raw.size)
        pos = np.minimum(np.searchsorted(self.raw_ids, raw), len(self.raw_ids) - 1)
        found = self.raw_ids[pos] == raw
        return np.where(found, self.mapped[pos], OOV_ID), int(raw.size - found.sum())


class ServingContract:
    """``serving.json`` of an artifact folder, parsed (see the module docstring)."""

    def __init__(self, folder: str | Path, tree: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.tree = tree
        if tree.get("format") != FORMAT:
            raise ValueError(f"{self.folder / CONTRACT_FILE}: format {tree.get('format')!r}, expected {FORMAT!r}")
        self.features: list[ServingFeature] = [ServingFeature(**f) for f in tree["features"]]
        self.outputs: tuple[str, ...] = tuple(tree["outputs"])
        self.unweighted = [f for f in self.features if not f.weighted]
        self.weighted = [f for f in self.features if f.weighted]
        #: dense inputs, program column order (empty: a sparse-only model)
        self.dense: list[ServingDense] = [ServingDense(**d) for d in tree.get("dense_features") or []]
        self._mappers: dict[str, IdMapper] = {}

    @classmethod
    def load(cls, folder: str | Path) -> ServingContract:
        path = Path(folder) / CONTRACT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a folder written by `ctnocvr export`")
        try:
            tree = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls(folder, tree)

    @property
    def field_names(self) -> list[str]:
        return [f.field for f in self.features]

    def feature(self, field: str) -> ServingFeature:
        for f in self.features:
            if f.field == field:
                return f
        raise KeyError(f"field {field!r} is not an input of this model; inputs: {self.field_names}")

    @property
    def dense_names(self) -> list[str]:
        return [d.name for d in self.dense]

    def dense_for_model(self, name: str, raw: np.ndarray) -> np.ndarray:
        """Raw values ``[B]`` of dense input ``name`` -> float32 ``[B]`` as the model saw them in training."""
        for d in self.dense:
            if d.name == name:
                return transform_dense(raw, d.transform, d.standardize, d.mean, d.std)
        raise KeyError(f"dense feature {name!r} is not an input of this model; dense inputs: {self.dense_names}")

    def program_path(self, precision: str) -> Path:
        if precision not in PROGRAM_FILES:
            raise ValueError(f"precision must be one of {sorted(PROGRAM_FILES)}, got {precision!r}")
        path = self.folder / PROGRAM_FILES[precision]
        if not path.is_file():
            hint = " (export with --aot to build it)" if precision == "aot" else ""
            raise FileNotFoundError(f"{path} not found: this artifact has no {precision} program{hint}")
        return path

    def mapper(self, field: str) -> IdMapper:
        if field not in self._mappers:
            self._mappers[field] = IdMapper(self.feature(field), self.folder)
        return self._mappers[field]

    def verify_files(self) -> list[str]:
        """Files whose size or sha256 differ from the contract (empty list: all intact)."""
        bad = []
        for rel, info in self.tree.get("files", {}).items():
            path = self.folder / rel
            if not path.is_file():
                bad.append(f"{rel}: missing")
            elif path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                bad.append(f"{rel}: content differs from serving.json (sha256)")
        return bad
