"""``Scorer``: load an exported model folder and score features, for embedding in a service.

Needs torch, torchrec (its import registers fbgemm's operators, which the programs call), numpy and
pyarrow, plus this file and ``contract.py``: no training code, no config files.

Example (the runnable version is in docs/serving.md)::

    from ctnocvr_rec.serving import Scorer

    scorer = Scorer.load("artifacts/model", precision="fp32")       # or "int8", "aot"
    out = scorer.score({"101": [[5432]], "205": [[98, 12]], ...})   # every field, raw Ali-CCP ids
    out["p_ctcvr"]                                                   # float32 [B]

Inputs of :meth:`Scorer.score`:

* a dict ``{field: list of id lists}`` (one inner list per row, possibly empty), keyed by the
  Ali-CCP field name (``"205"``); fields whose values carry weights (``serving.json``
  ``weights_from_input``) also need ``"<field>__w"`` with one weight per id (unless no row has an
  id of that field);
* or KeyedJaggedTensors: ``score(features, weighted_features)`` with keys ``f_<field>``, as in a
  training batch (``batch.sparse_features, batch.weighted_features``); the keys may be split between
  the two in any way, but a field with input weights must come with weights.

Dense features (a model trained on a prepared set with ``dense:`` features; ``serving.json
["dense_features"]``): in a dict, one number per row under the feature's name (``{"D109_14": [0.5,
3.0, ...]}``); with KJT input, ``dense=`` a ``[B, D]`` array or tensor in ``dense_features`` order (a
training batch's ``batch.dense``). ``dense_values="raw"`` (the default with ``ids="raw"``): values as in
the source data, transformed here by the exported ``log1p`` / standardisation (``data/dense.py``, the
function ``data prepare`` used); ``"transformed"`` (the default with ``ids="mapped"``): values as a
prepared set stores them.

``ids="raw"`` (default): ids are raw Ali-CCP feature ids, mapped through the exported vocabularies
(an unseen id -> row 0, the OOV row; :meth:`Scorer.encode` counts them) or hashed. ``ids="mapped"``:
ids are already table rows (what ``data prepare`` writes and the trainer's batches hold); each must
lie in ``[0, num_embeddings)``. A missing or unknown field, a non-integer id, rows of different
counts or an id out of range raise ``ValueError`` naming the field.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchrec  # noqa: F401  (registers fbgemm's operators used by the programs)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnocvr_rec.serving.contract import ServingContract, ServingFeature

PRECISIONS = ("fp32", "int8", "aot")


@dataclass
class Encoded:
    """Program inputs of one batch plus what the id mapping saw."""

    inputs: tuple[torch.Tensor, ...]  # the five program tensors (+ ``dense`` [B, D] with dense features)
    batch_size: int
    ids: dict[str, int] = field(default_factory=dict)  # field -> ids in the batch
    unseen: dict[str, int] = field(default_factory=dict)  # field -> raw ids absent from the vocabulary
    oov: dict[str, int] = field(default_factory=dict)  # field -> ids mapped to the OOV row 0


def load_program(path: str | Path, precision: str) -> Any:
    """The callable program of one precision: ``program(*inputs) -> [B, 4]``."""
    if precision == "fp32":
        return torch.export.load(str(path)).module()
    if precision == "int8":
        return torch.jit.load(str(path))
    if precision == "aot":
        return torch._inductor.aoti_load_package(str(path))
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


class Scorer:
    """A loaded model folder: :meth:`score` features -> ``{p_ctr, p_cvr, p_ctcvr, p_ctnocvr}`` ``[B]``."""

    def __init__(self, contract: ServingContract, precision: str, program: Any) -> None:
        self.contract = contract
        self.precision = precision
        self.program = program
        self.outputs = contract.outputs

    @classmethod
    def load(cls, folder: str | Path, precision: str = "fp32", verify: bool = False) -> Scorer:
        """Load ``folder`` (written by ``ctnocvr export``); ``verify`` checks every file's sha256 first."""
        contract = ServingContract.load(folder)
        if verify:
            bad = contract.verify_files()
            if bad:
                raise ValueError(f"{folder}: damaged artifact: " + "; ".join(bad))
        return cls(contract, precision, load_program(contract.program_path(precision), precision))

    @torch.no_grad()
    def score(
        self,
        features: Mapping[str, Sequence[Any]] | KeyedJaggedTensor,
        weighted_features: KeyedJaggedTensor | None = None,
        ids: str = "raw",
        dense: Any = None,
        dense_values: str = "",
    ) -> dict[str, torch.Tensor]:
        """Probabilities of every row: ``{name: float32 [B]}`` for ``serving.json["outputs"]``."""
        return self.score_encoded(self.encode(features, weighted_features, ids=ids, dense=dense,
                                              dense_values=dense_values))

    @torch.no_grad()
    def score_encoded(self, encoded: Encoded) -> dict[str, torch.Tensor]:
        if encoded.batch_size == 0:
            return {name: torch.zeros(0) for name in self.outputs}
        out = self.program(*encoded.inputs)
        return {name: out[:, k] for k, name in enumerate(self.outputs)}

    # -------------------------------------------------------------------------------------------
    # inputs -> the five program tensors
    # -------------------------------------------------------------------------------------------

    def encode(
        self,
        features: Mapping[str, Sequence[Any]] | KeyedJaggedTensor,
        weighted_features: KeyedJaggedTensor | None = None,
        ids: str = "raw",
        dense: Any = None,
        dense_values: str = "",
    ) -> Encoded:
        """Validate, map and lay out ``features`` (and the dense values, see the module docstring) as
        program inputs."""
        if ids not in ("raw", "mapped"):
            raise ValueError(f"ids must be 'raw' or 'mapped', got {ids!r}")
        if isinstance(features, KeyedJaggedTensor):
            columns, batch_size = self._columns_from_kjts(features, weighted_features)
        elif isinstance(features, Mapping):
            if weighted_features is not None:
                raise ValueError("weighted_features goes with KJT input; with a dict put weights under '<field>__w'")
            if dense is not None:
                raise ValueError("dense= goes with KJT input; with a dict put each dense feature under its name")
            dense_names = set(self.contract.dense_names)
            columns, batch_size = self._columns_from_dict({k: v for k, v in features.items() if k not in dense_names})
            dense = {k: v for k, v in features.items() if k in dense_names}
        else:
            raise ValueError(f"features must be a dict {{field: list of id lists}} or a KeyedJaggedTensor, "
                             f"got {type(features).__name__}")
        return self.encode_columns(columns, batch_size, ids, dense=dense, dense_values=dense_values)

    def encode_columns(
        self, columns: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]], batch_size: int,
        ids: str = "raw", dense: Any = None, dense_values: str = "",
    ) -> Encoded:
        """Per-field numpy columns ``{field: (ids [n], lengths [B], weights [n] or None)}`` -> inputs.

        The fast path of :meth:`encode` (``ctnocvr predict`` feeds raw-file columns this way); the
        columns must be complete and consistent (``encode`` checks user input before calling this).
        ``dense``: ``{name: values [B]}`` or a ``[B, D]`` array / tensor (``dense_features`` order), or
        None for a sparse-only model; ``dense_values``: ``raw`` | ``transformed`` (default: ``raw``
        with ``ids="raw"``, else ``transformed``).
        """
        encoded = Encoded(inputs=(), batch_size=batch_size)  # type: ignore[arg-type]
        groups = []
        for group, weighted in ((self.contract.unweighted, False), (self.contract.weighted, True)):
            values, lengths, weights = [], [], []
            for spec in group:
                col_ids, col_lengths, col_weights = columns[spec.field]
                col_ids = self._map_ids(spec, col_ids, ids, encoded)
                values.append(col_ids)
                lengths.append(col_lengths)
                if weighted:
                    weights.append(col_weights if col_weights is not None
                                   else np.ones(len(col_ids), np.float32))
            groups.append(_group_tensors(values, lengths, weights if weighted else None))
        (v, ln, _), (wv, wl, w) = groups
        encoded.inputs = (v, ln, wv, wl, w)
        if self.contract.dense:
            kind = dense_values or ("raw" if ids == "raw" else "transformed")
            encoded.inputs = (*encoded.inputs, self._dense_tensor(dense, batch_size, kind))
        elif dense is not None and len(dense) > 0:
            raise ValueError("this model has no dense inputs (serving.json dense_features is empty); "
                             f"got dense values {sorted(dense) if isinstance(dense, Mapping) else 'as an array'}")
        return encoded

    def _dense_tensor(self, dense: Any, batch_size: int, kind: str) -> torch.Tensor:
        """The program's ``dense`` input ``[B, D]`` float32 from a dict or an array (see :meth:`encode_columns`)."""
        if kind not in ("raw", "transformed"):
            raise ValueError(f"dense_values must be 'raw' or 'transformed', got {kind!r}")
        names = self.contract.dense_names
        if dense is None:
            raise ValueError(f"missing dense feature(s) {names}: this model needs them "
                             "(one number per row; with KJT input pass dense=[B, D])")
        if isinstance(dense, Mapping):
            missing = [n for n in names if n not in dense]
            unknown = sorted(set(map(str, dense)) - set(names))
            if missing or unknown:
                raise ValueError(f"dense inputs: missing {missing}, unknown {unknown}; this model's: {names}")
            cols = []
            for name in names:
                col = np.asarray(dense[name])
                if col.shape != (batch_size,) or col.dtype.kind not in "iuf":
                    raise ValueError(f"dense feature {name!r}: expected {batch_size} numbers (one per row), "
                                     f"got shape {list(col.shape)} of {col.dtype}")
                cols.append(col)
            matrix = np.stack(cols, axis=1) if cols else np.zeros((batch_size, 0))
        else:
            matrix = dense.detach().cpu().numpy() if isinstance(dense, torch.Tensor) else np.asarray(dense)
            if matrix.shape != (batch_size, len(names)) or matrix.dtype.kind not in "iuf":
                raise ValueError(f"dense: expected a [{batch_size}, {len(names)}] array of numbers "
                                 f"(columns {names}), got shape {list(matrix.shape)} of {matrix.dtype}")
        out = np.empty((batch_size, len(names)), np.float32)
        for k, name in enumerate(names):
            if kind == "raw":
                try:
                    out[:, k] = self.contract.dense_for_model(name, matrix[:, k])
                except ValueError as e:
                    raise ValueError(f"dense feature {name!r}: {e}") from None
            else:
                out[:, k] = matrix[:, k]
                if not np.isfinite(out[:, k]).all():
                    row = int(np.flatnonzero(~np.isfinite(out[:, k]))[0])
                    raise ValueError(f"dense feature {name!r}: row {row} is not finite ({out[row, k]})")
        return torch.from_numpy(out)

    def _map_ids(self, spec: ServingFeature, col_ids: np.ndarray, ids: str, encoded: Encoded) -> np.ndarray:
        if ids == "raw":
            mapped, unseen = self.contract.mapper(spec.field).map(col_ids)
            encoded.unseen[spec.field] = unseen
        else:
            mapped = col_ids.astype(np.int64, copy=False)
            bad = np.flatnonzero((mapped < 0) | (mapped >= spec.num_embeddings))
            if len(bad):
                raise ValueError(
                    f"feature {spec.field!r}: mapped id {int(mapped[bad[0]])} outside [0, {spec.num_embeddings}) "
                    f"({len(bad)} such ids); pass ids='raw' for raw Ali-CCP ids"
                )
        encoded.ids[spec.field] = len(mapped)
        encoded.oov[spec.field] = int((mapped == 0).sum()) if spec.mapping == "vocab" else 0
        return mapped

    def _columns_from_dict(
        self, features: Mapping[str, Sequence[Sequence[Any]]]
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]], int]:
        names = self.contract.field_names
        allowed = set(names) | {f"{f.field}__w" for f in self.contract.features if f.weights_from_input}
        unknown = sorted(set(map(str, features)) - allowed)
        if unknown:
            raise ValueError(f"unknown input(s) {unknown}; this model's inputs: {names} "
                             "(plus '<field>__w' weights for weighted fields)")
        missing = [n for n in names if n not in features]
        if missing:
            raise ValueError(f"missing feature(s) {missing}: every input field is required "
                             "(an empty list for a row without ids)")
        batch_size = len(features[names[0]])
        columns = {}
        for spec in self.contract.features:
            rows = features[spec.field]
            ids, lengths = _flatten(rows, spec.field, batch_size, names[0], integer=True)
            weights = None
            if spec.weights_from_input:
                key = f"{spec.field}__w"
                if key not in features and len(ids) == 0:
                    columns[spec.field] = (ids, lengths, np.zeros(0, np.float32))  # no ids, no weights needed
                    continue
                if key not in features:
                    raise ValueError(f"feature {spec.field!r} is weighted: pass its weights as {key!r} "
                                     "(one list per row, one weight per id)")
                weights, w_lengths = _flatten(features[key], key, batch_size, names[0], integer=False)
                if not np.array_equal(w_lengths, lengths):
                    row = int(np.flatnonzero(w_lengths != lengths)[0])
                    raise ValueError(f"feature {spec.field!r}: row {row} has {lengths[row]} ids but "
                                     f"{w_lengths[row]} weights in {key!r}")
            columns[spec.field] = (ids, lengths, weights)
        return columns, batch_size

    def _columns_from_kjts(
        self, features: KeyedJaggedTensor, weighted_features: KeyedJaggedTensor | None
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]], int]:
        parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        batch_size: int | None = None
        for kjt in (features, weighted_features):
            if kjt is None:
                continue
            if batch_size is not None and kjt.stride() != batch_size:
                raise ValueError(f"features and weighted_features have {batch_size} and {kjt.stride()} rows")
            batch_size = kjt.stride()
            for key, jt in kjt.to_dict().items():
                values = jt.values()
                if values.dtype not in (torch.int32, torch.int64):
                    raise ValueError(f"feature {key!r}: ids must be int32 or int64, got {values.dtype}")
                w = jt.weights_or_none()
                parts[key] = (values.numpy(), jt.lengths().numpy().astype(np.int64),
                              None if w is None else w.to(torch.float32).numpy())
        columns = {}
        for spec in self.contract.features:
            if spec.feature not in parts:
                raise ValueError(f"missing feature {spec.feature!r} (field {spec.field}) in the KJT input; "
                                 f"this model's keys: {[f.feature for f in self.contract.features]}")
            ids, lengths, weights = parts[spec.feature]
            if spec.weights_from_input and weights is None:
                raise ValueError(f"feature {spec.feature!r} is weighted but came in a KJT without weights "
                                 "(pass it in weighted_features)")
            columns[spec.field] = (ids, lengths, weights if spec.weighted else None)
        assert batch_size is not None
        return columns, batch_size


def _flatten(rows: Sequence[Sequence[Any]], name: str, batch_size: int, first: str,
             integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` (list of lists) -> (flat values, lengths int64 [B]), validated."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence | np.ndarray):
        raise ValueError(f"feature {name!r}: expected a list of id lists (one per row), got {type(rows).__name__}")
    if len(rows) != batch_size:
        raise ValueError(f"feature {name!r} has {len(rows)} rows, {first!r} has {batch_size}")
    try:
        lengths = np.fromiter(map(len, rows), np.int64, count=len(rows))
    except TypeError:
        raise ValueError(f"feature {name!r}: every row must be a list of ids (e.g. [[12], [], [7, 9]])") from None
    flat = np.asarray(list(itertools.chain.from_iterable(rows)))
    if flat.size == 0:
        return np.zeros(0, np.int64 if integer else np.float32), lengths
    kind = flat.dtype.kind
    if integer and kind not in "iu":
        raise ValueError(f"feature {name!r}: ids must be integers, got {flat.dtype} (e.g. {flat.flat[0]!r})")
    if not integer and kind not in "iuf":
        raise ValueError(f"{name!r}: weights must be numbers, got {flat.dtype} (e.g. {flat.flat[0]!r})")
    return flat.astype(np.int64 if integer else np.float32), lengths


def _group_tensors(
    values: list[np.ndarray], lengths: list[np.ndarray], weights: list[np.ndarray] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-field columns -> (values int64 [N], lengths int32 [F, B], weights float32 [N])."""
    if not values:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0)
    v = torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False))
    ln = torch.from_numpy(np.stack(lengths).astype(np.int32))
    w = torch.from_numpy(np.concatenate(weights).astype(np.float32, copy=False)) if weights else torch.zeros(0)
    return v, ln, w
