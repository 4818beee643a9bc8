"""The serving program: plain tensors in, ``[B, 4]`` probabilities out; float, int8 and AOT builds.

KeyedJaggedTensors do not cross a program boundary well (``torch.export`` flattens them into six
tensors with a fixed stride, TorchScript needs their full class), so the program's inputs are the
KJTs' parts, with the lengths viewed as ``[keys, batch]`` so that one dynamic dim ``batch`` ties both
groups (``ctnocvr_rec.serving.contract`` documents the layout). :class:`ServingProgram` rebuilds the
two KJTs inside and calls the ranker's generic ``predict(features, weighted_features, dense)``, whose
outputs ``p_ctr, p_cvr, p_ctcvr, p_ctnocvr`` every ranker provides, so a new ranker exports unchanged.
A ranker with dense features gets :class:`DenseServingProgram`, whose sixth input is the ``[B, D]``
float32 tensor of transformed dense values (:func:`serving_program` picks the class); a sparse-only
ranker's program is exactly the five-input one it was before.

Builds (facts checked with torch 2.13 / torchrec 1.8 / fbgemm-gpu-cpu 1.8 on CPU):

* :func:`export_float`: ``torch.export`` (non-strict) with dynamic ``batch``, ``num_ids`` and
  ``num_weighted_ids``; saved with ``torch.export.save`` (``.pt2``).
* :func:`quantize_int8`: the EBCs' tables row-wise int8 (``torchrec.inference.modules.
  quantize_embeddings``), then ``torchrec.fx.symbolic_trace`` + ``torch.jit.script``. (``torch.export``
  of a quantised EBC fails: fbgemm's ``AtomicCounter`` has no fake class.) Dense layers stay float.
* :func:`compile_aot`: ``torch._inductor.aoti_compile_and_package`` of the float program.

Example::

    program = serving_program(ranker).eval()
    inputs = example_inputs(ranker, batch_size=8)           # the five (six with dense) tensors
    probabilities = program(*inputs)                        # [8, 4]
    exported = export_float(ranker, inputs)                 # dynamic batch and id counts
    exported.module()(*example_inputs(ranker, batch_size=300, seed=1))
"""


# no `from __future__ import annotations`: fx codegen of the traced forward needs real annotations
import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnocvr_rec.models.rankers import MultiTaskRanker
from ctnocvr_rec.modules.dense_arch import DenseFeatureArch
from ctnocvr_rec.modules.field_embedding import FieldEmbedding
from ctnocvr_rec.serving.contract import OUTPUTS

#: the five tensors of the contract, plus ``dense`` for a ranker with dense features
ProgramInputs = tuple[torch.Tensor, ...]


def sparse_arch_of(ranker: nn.Module) -> FieldEmbedding:
    """The ranker's :class:`FieldEmbedding` (its KJT keys and table sizes define the inputs)."""
    for sub in ranker.modules():
        if isinstance(sub, FieldEmbedding):
            return sub
    raise ValueError(f"{type(ranker).__name__} has no FieldEmbedding: cannot derive its serving inputs")


def num_dense_of(ranker: nn.Module) -> int:
    """``D`` of the ranker's :class:`DenseFeatureArch` (0: sparse-only, no dense program input)."""
    for sub in ranker.modules():
        if isinstance(sub, DenseFeatureArch):
            return sub.in_features
    return 0


class ServingProgram(nn.Module):
    """``(values, lengths, weighted_values, weighted_lengths, weights)`` -> ``[B, 4]`` probabilities.

    ``values`` int64 ``[N]``, ``lengths`` int32 ``[F, B]`` (the unweighted fields in
    ``unweighted_keys`` order), ``weighted_values`` int64 ``[Nw]``, ``weighted_lengths`` int32
    ``[Fw, B]``, ``weights`` float32 ``[Nw]``; output columns :data:`~ctnocvr_rec.serving.contract.
    OUTPUTS`. A group without keys is not read (pass ``[0]`` / ``[0, 1]`` tensors).
    """

    columns = OUTPUTS

    def __init__(self, ranker: MultiTaskRanker) -> None:
        super().__init__()
        self.ranker = ranker
        arch = sparse_arch_of(ranker)
        self.unweighted_keys: list[str] = list(arch.unweighted_feature_names)
        self.weighted_keys: list[str] = list(arch.weighted_feature_names)
        self.has_weighted: bool = len(self.weighted_keys) > 0

    def forward(
        self,
        values: torch.Tensor,
        lengths: torch.Tensor,
        weighted_values: torch.Tensor,
        weighted_lengths: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        return self._probabilities(self._kjts(values, lengths, weighted_values, weighted_lengths, weights), None)

    def _kjts(
        self,
        values: torch.Tensor,
        lengths: torch.Tensor,
        weighted_values: torch.Tensor,
        weighted_lengths: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor | None]:
        batch_size = lengths.size(1) if len(self.unweighted_keys) > 0 else weighted_lengths.size(1)
        features = KeyedJaggedTensor(
            keys=self.unweighted_keys, values=values, lengths=lengths.reshape(-1), stride=batch_size
        )
        weighted_features: KeyedJaggedTensor | None = None
        if self.has_weighted:
            weighted_features = KeyedJaggedTensor(
                keys=self.weighted_keys,
                values=weighted_values,
                lengths=weighted_lengths.reshape(-1),
                weights=weights,
                stride=batch_size,
            )
        return features, weighted_features

    def _probabilities(self, kjts: tuple[KeyedJaggedTensor, KeyedJaggedTensor | None],
                       dense: torch.Tensor | None) -> torch.Tensor:
        p = self.ranker.predict(kjts[0], kjts[1], dense)
        return torch.stack([p["p_ctr"], p["p_cvr"], p["p_ctcvr"], p["p_ctnocvr"]], dim=1)


class DenseServingProgram(ServingProgram):
    """:class:`ServingProgram` of a ranker with dense features: a sixth input ``dense`` float32
    ``[B, D]`` (transformed values, ``serving.json["dense_features"]`` order)."""

    def __init__(self, ranker: MultiTaskRanker) -> None:
        super().__init__(ranker)
        self.num_dense: int = num_dense_of(ranker)

    def forward(  # type: ignore[override]
        self,
        values: torch.Tensor,
        lengths: torch.Tensor,
        weighted_values: torch.Tensor,
        weighted_lengths: torch.Tensor,
        weights: torch.Tensor,
        dense: torch.Tensor,
    ) -> torch.Tensor:
        return self._probabilities(self._kjts(values, lengths, weighted_values, weighted_lengths, weights), dense)


def serving_program(ranker: MultiTaskRanker) -> ServingProgram:
    """The program of ``ranker``: five inputs, or six (:class:`DenseServingProgram`) with dense features."""
    return DenseServingProgram(ranker) if num_dense_of(ranker) else ServingProgram(ranker)


def kjt_to_inputs(
    features: KeyedJaggedTensor | None, weighted_features: KeyedJaggedTensor | None, batch_size: int,
    dense: torch.Tensor | None = None,
) -> ProgramInputs:
    """A batch's two KJTs (``CtnocvrBatch.sparse_features / weighted_features``) and its ``dense``
    (None for a sparse-only batch) -> program inputs."""

    def group(kjt: KeyedJaggedTensor | None, weighted: bool) -> tuple[torch.Tensor, ...]:
        if kjt is None or not kjt.keys():
            empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, dtype=torch.int32))
            return (*empty, torch.zeros(0, dtype=torch.float32)) if weighted else empty
        parts = (kjt.values().to(torch.int64), kjt.lengths().to(torch.int32).reshape(len(kjt.keys()), batch_size))
        if weighted:
            w = kjt.weights_or_none()
            parts = (*parts, w.to(torch.float32) if w is not None else torch.ones(parts[0].numel()))
        return parts

    plain = group(features, weighted=False)
    weighted = group(weighted_features, weighted=True)
    inputs = (plain[0], plain[1], weighted[0], weighted[1], weighted[2])
    return inputs if dense is None else (*inputs, dense.to(torch.float32))


def example_inputs(ranker: nn.Module, batch_size: int = 8, seed: int = 0, max_ids: int = 3) -> ProgramInputs:
    """Random valid inputs: 1..``max_ids`` ids per (field, row), ids within each table, weights in (0.5, 1.5),
    and, for a ranker with dense features, ``dense`` ``[B, D]`` ~ N(0, 1) (standardised-like values)."""
    arch = sparse_arch_of(ranker)
    rows = {cfg_feature: cfg.num_embeddings for ebc in (arch.embedding_bag_collection,
                                                          arch.weighted_embedding_bag_collection)
            if ebc is not None for cfg in ebc.embedding_bag_configs() for cfg_feature in cfg.feature_names}
    gen = torch.Generator().manual_seed(seed)

    def group(keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not keys:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0)
        lengths = torch.randint(1, max_ids + 1, (len(keys), batch_size), generator=gen, dtype=torch.int32)
        values = torch.cat([
            torch.randint(0, rows[k], (int(lengths[i].sum()),), generator=gen, dtype=torch.int64)
            for i, k in enumerate(keys)
        ])
        weights = 0.5 + torch.rand(values.numel(), generator=gen)
        return values, lengths, weights

    v, lengths, _ = group(arch.unweighted_feature_names)
    wv, wl, w = group(arch.weighted_feature_names)
    num_dense = num_dense_of(ranker)
    if num_dense:
        return v, lengths, wv, wl, w, torch.randn(batch_size, num_dense, generator=gen)
    return v, lengths, wv, wl, w


def _dynamic_shapes(program: ServingProgram) -> tuple[dict[int, torch.export.Dim] | None, ...]:
    batch = torch.export.Dim("batch", min=1)
    plain_ids = torch.export.Dim("num_ids")
    weighted_ids = torch.export.Dim("num_weighted_ids")
    plain = ({0: plain_ids}, {1: batch}) if program.unweighted_keys else (None, None)
    weighted = ({0: weighted_ids}, {1: batch}, {0: weighted_ids}) if program.has_weighted else (None, None, None)
    dense = ({0: batch},) if isinstance(program, DenseServingProgram) else ()
    return (*plain, *weighted, *dense)


class _DropKjtToDictNote(logging.Filter):
    """torchrec logs a warning on every KJT ``to_dict`` under non-strict export; the cost is at
    export time only (the traced program has no Python), so it says nothing to the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "non-strict torch.export KJT to_dict" not in record.getMessage()


def export_float(ranker: MultiTaskRanker, inputs: ProgramInputs) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of :class:`ServingProgram` with dynamic batch size and id counts.

    ``inputs``: an example (:func:`example_inputs`; batch >= 2 and >= 2 ids per group, or torch
    specialises the dims). Call the result with ``program.module()(*inputs)``.
    """
    program = serving_program(ranker).eval()
    note = _DropKjtToDictNote()
    logging.getLogger().addFilter(note)
    try:
        with torch.no_grad():
            return torch.export.export(program, tuple(inputs), dynamic_shapes=_dynamic_shapes(program), strict=False)
    finally:
        logging.getLogger().removeFilter(note)


def quantize_int8(ranker: MultiTaskRanker) -> torch.jit.ScriptModule:
    """Row-wise int8 embedding tables + fx trace + TorchScript (the ranker itself is not changed)."""
    import torchrec.fx
    from torchrec.inference.modules import quantize_embeddings

    program = serving_program(copy.deepcopy(ranker)).eval()
    quantize_embeddings(program, dtype=torch.qint8, inplace=True)
    return torch.jit.script(torchrec.fx.symbolic_trace(program))


def compile_aot(exported: torch.export.ExportedProgram, path: str | Path) -> float:
    """AOTInductor package of the float program at ``path`` (for this machine's CPU); returns seconds."""
    started = time.perf_counter()
    torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
    return time.perf_counter() - started
