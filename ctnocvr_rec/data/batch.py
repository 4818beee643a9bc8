"""The batch contract between the data loader, the rankers and the training pipeline.

A :class:`CtnocvrBatch` holds the schema's fields as two ``KeyedJaggedTensor`` s, the dense features
(when the schema has any) and the per-row labels: ``sparse_features``, an *unweighted* KJT of the
fields whose table is unweighted, and
``weighted_features``, a weighted KJT of the fields whose table is weighted (a table is weighted when
any field mapped to it is ``weighted: true``, see ``FieldSchema.weighted_table_names``; its plain
fields carry weight 1.0), or ``None`` when the schema has no weighted field. Keys are ``f_<field>``,
schema order within each KJT. Two KJTs because fbgemm's weighted kernels cost extra work (weighted
csr2csc, per-sample-weight gradients) that unweighted fields need not pay.

``dense`` is a float32 ``[B, D]`` tensor of the schema's dense features (``FieldSchema.dense``, in that
order; values as the prepared set stores them, i.e. already transformed) or ``None`` for a
sparse-only schema.

The batch is a ``torchrec.streamable.Pipelineable`` so that
``TrainPipelineSparseDist`` can move it and overlap its input distribution.

The CTnoCVR label (paper Sec. 2.2: c = 1 iff click = 1 and conversion = 0) is derived by
:func:`ctnocvr_rec.labels.derive_ctnocvr_label`, its only definition (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from ctnocvr_rec.labels import derive_ctnocvr_label

__all__ = ["CtnocvrBatch", "derive_ctnocvr_label"]


@dataclass
class CtnocvrBatch(Pipelineable):
    """One training/evaluation batch.

    Attributes:
        sparse_features: unweighted KJT (no weights) of the fields of unweighted tables, keys
            ``f_<field>`` (schema order), ``stride() == B``.
        weighted_features: weighted KJT of the fields of weighted tables (keys ``f_<field>``, schema
            order, ``stride() == B``), or ``None`` when the schema has no weighted field.
        click: float32 ``[B]`` in {0, 1}.
        conversion: float32 ``[B]`` in {0, 1} (never 1 where click is 0: such rows are rejected).
        ctnocvr: float32 ``[B]``, :func:`derive_ctnocvr_label` of the two above.
        sample_id: int64 ``[B]``, the row's ``sample_id`` from the skeleton file (joins predictions
            to the synthetic ground-truth sidecar).
        request_id: int64 ``[B]``, the row's ``common_feature_index`` mapped to an integer: the
            impressions of one request (used for ranking reports).
        user_id: int64 ``[B]``, raw user id (field 101) or -1 (used for GAUC).
        dense: float32 ``[B, D]``, the dense features in ``FieldSchema.dense`` order (already
            transformed, ``ctnocvr_rec/data/dense.py``), or ``None`` when the schema has none.
    """

    sparse_features: KeyedJaggedTensor
    click: torch.Tensor
    conversion: torch.Tensor
    ctnocvr: torch.Tensor
    sample_id: torch.Tensor
    request_id: torch.Tensor
    user_id: torch.Tensor
    weighted_features: KeyedJaggedTensor | None = None
    dense: torch.Tensor | None = None

    @classmethod
    def from_labels(
        cls,
        sparse_features: KeyedJaggedTensor,
        click: torch.Tensor,
        conversion: torch.Tensor,
        sample_id: torch.Tensor | None = None,
        request_id: torch.Tensor | None = None,
        user_id: torch.Tensor | None = None,
        weighted_features: KeyedJaggedTensor | None = None,
        dense: torch.Tensor | None = None,
    ) -> CtnocvrBatch:
        """Build a batch, deriving ``ctnocvr`` and defaulting the id columns."""
        n = click.shape[0]
        if dense is not None and (dense.dim() != 2 or dense.shape[0] != n):
            raise ValueError(f"dense must be [B, D] with B = {n} rows, got shape {list(dense.shape)}")
        click = click.to(torch.float32)
        conversion = conversion.to(torch.float32)
        ids = torch.arange(n, dtype=torch.int64)
        return cls(
            sparse_features=sparse_features,
            click=click,
            conversion=conversion,
            ctnocvr=derive_ctnocvr_label(click, conversion),
            sample_id=ids if sample_id is None else sample_id,
            request_id=ids if request_id is None else request_id,
            user_id=torch.full((n,), -1, dtype=torch.int64) if user_id is None else user_id,
            weighted_features=weighted_features,
            dense=dense,
        )

    @property
    def batch_size(self) -> int:
        return int(self.click.shape[0])

    @property
    def clicked_mask(self) -> torch.Tensor:
        return self.click > 0.5

    def to(self, device: torch.device, non_blocking: bool = False) -> CtnocvrBatch:
        return CtnocvrBatch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            click=self.click.to(device=device, non_blocking=non_blocking),
            conversion=self.conversion.to(device=device, non_blocking=non_blocking),
            ctnocvr=self.ctnocvr.to(device=device, non_blocking=non_blocking),
            sample_id=self.sample_id.to(device=device, non_blocking=non_blocking),
            request_id=self.request_id.to(device=device, non_blocking=non_blocking),
            user_id=self.user_id.to(device=device, non_blocking=non_blocking),
            weighted_features=None if self.weighted_features is None
            else self.weighted_features.to(device=device, non_blocking=non_blocking),
            dense=None if self.dense is None else self.dense.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        if self.weighted_features is not None:
            self.weighted_features.record_stream(stream)
        if self.dense is not None:
            self.dense.record_stream(stream)
        for t in (self.click, self.conversion, self.ctnocvr, self.sample_id, self.request_id, self.user_id):
            t.record_stream(stream)

    def pin_memory(self) -> CtnocvrBatch:
        return CtnocvrBatch(
            sparse_features=self.sparse_features.pin_memory(),
            click=self.click.pin_memory(),
            conversion=self.conversion.pin_memory(),
            ctnocvr=self.ctnocvr.pin_memory(),
            sample_id=self.sample_id.pin_memory(),
            request_id=self.request_id.pin_memory(),
            user_id=self.user_id.pin_memory(),
            weighted_features=None if self.weighted_features is None else self.weighted_features.pin_memory(),
            dense=None if self.dense is None else self.dense.pin_memory(),
        )
