"""The backbones of the paper's Table 3: ESMM, MMoE, CGC, PLE, each trained by any CVR objective.

Every ranker is ``sparse_arch`` (:class:`FieldEmbedding`, the unweighted and weighted EBCs), joined,
when the schema has dense features, by ``dense_arch`` (:class:`DenseFeatureArch`, DLRM's dense MLP:
``batch.dense [B, D] -> [B, embedding_dim]``, concatenated after the pooled embeddings like one
more field; ``None`` for a sparse-only schema, which then has exactly the parameters it had before)
-> dense task logits ``[B, T]`` (one tower per task of the objective) -> the objective (``head``, a
:class:`~ctnocvr_rec.modules.cvr_objective.CvrObjective`). ``forward(batch)`` returns
``(loss, outputs)`` as ``TrainPipelineSparseDist`` expects (see ``docs/design.md``, "Model
contract"); ``outputs`` are detached. The towers are the objective's ``tasks``: CTR, CVR, the
method's own (e.g. DCMT's counterfactual CVR tower) and, in tower mode, CTnoCVR.

=========  ====================================  ==================================================
backbone   ``base`` objective                    ``use_ctnocvr`` (``ctnocvr_mode``)
=========  ====================================  ==================================================
ESMM       CTR + CTCVR losses (Ma et al. 2018);   "derived": adds λ_ctnocvr·BCE(c, pCTR·(1−pCVR))
           towers read the shared embedding      (eq. 2)
MMoE       CTR + clicked-only CVR; shared         "tower": third task with own tower and gate,
           experts, a softmax gate per task      + ω score term
CGC        as MMoE with task-specific + shared    as MMoE
           experts (eqs. 3-4)
PLE        stacked CGC levels with shared gates   as MMoE
=========  ====================================  ==================================================

The backbones and methods are listed in ``ctnocvr_rec/registry.py``; ``build_model`` is in
``models/build.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnocvr_rec.config import ModelConfig
from ctnocvr_rec.data.batch import CtnocvrBatch
from ctnocvr_rec.modules.cvr_objective import CvrObjective
from ctnocvr_rec.modules.dense_arch import DenseFeatureArch
from ctnocvr_rec.modules.field_embedding import FieldEmbedding
from ctnocvr_rec.modules.towers import MultiTaskOverArch, TaskTower


class MultiTaskRanker(nn.Module):
    """Shared skeleton: embed (+ dense arch), compute task logits (subclass), apply the objective, pass
    labels/ids through.

    ``input_dim``: width of the representation ``x`` the subclass's layers read, ``sparse_arch.output_dim``
    plus ``dense_arch.out_features`` when there is a dense arch.

    Call: ``batch`` (:class:`CtnocvrBatch`, B rows) -> ``(loss, outputs)``; ``outputs`` holds ``p_ctr,
    p_cvr, p_ctcvr, p_ctnocvr`` ``[B]``, ``loss`` and ``loss_<term>`` scalars and the batch's
    ``click, conversion, ctnocvr, sample_id, request_id, user_id`` ``[B]``, all detached.
    """

    #: term -> ModelConfig field: the weights of the ``base`` objective on this backbone
    base_weights: ClassVar[dict[str, str]] = {}
    #: how ``use_ctnocvr`` adds the CTnoCVR task: "derived" term or own "tower"
    ctnocvr_mode: ClassVar[str] = "tower"

    def __init__(self, sparse_arch: FieldEmbedding, head: CvrObjective,
                 dense_arch: DenseFeatureArch | None = None) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        # None is a plain attribute, not a submodule: a sparse-only ranker's state_dict stays as it was
        self.dense_arch: DenseFeatureArch | None = dense_arch
        self.head = head
        #: task names in tower order (= the objective's)
        self.tasks: tuple[str, ...] = head.tasks
        self.input_dim: int = sparse_arch.output_dim + (dense_arch.out_features if dense_arch is not None else 0)

    @property
    def num_dense_features(self) -> int:
        """``D`` of the dense input (0: sparse-only)."""
        return self.dense_arch.in_features if self.dense_arch is not None else 0

    def representation(self, features: KeyedJaggedTensor, weighted_features: KeyedJaggedTensor | None,
                       dense: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``[B, input_dim]``: pooled embeddings, then the dense arch's block (when there is one)."""
        x = self.sparse_arch(features, weighted_features)
        if self.dense_arch is None:
            return x
        if dense is None:
            raise ValueError(f"{type(self).__name__} was built with {self.dense_arch.in_features} dense feature(s) "
                             "but the batch has none (batch.dense is None: a prepared set or schema without them?)")
        return torch.cat([x, self.dense_arch(dense)], dim=1)

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, D]`` -> logits ``[B, T]``, columns in ``self.tasks`` order."""
        raise NotImplementedError

    def forward(self, batch: CtnocvrBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # both KJTs straight from the batch: the pipeline's fx trace must see each sharded EBC fed by a
        # getattr on the batch to pipeline its input distribution
        x = self.representation(batch.sparse_features, batch.weighted_features, batch.dense)
        loss, head_out = self.head(self.task_logits(x), batch.click, batch.conversion, batch.ctnocvr)
        # A new dict from known keys (no item assignment): under the pipeline's fx trace the head is
        # a leaf module and `head_out` a Proxy, which supports indexing but not mutation.
        outputs = {key: head_out[key] for key in self.head.output_keys}
        outputs["click"] = batch.click
        outputs["conversion"] = batch.conversion
        outputs["ctnocvr"] = batch.ctnocvr
        outputs["sample_id"] = batch.sample_id
        outputs["request_id"] = batch.request_id
        outputs["user_id"] = batch.user_id
        return loss, outputs

    def predict(
        self, features: KeyedJaggedTensor, weighted_features: KeyedJaggedTensor | None = None,
        dense: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Inference: ``features`` (unweighted KJT), ``weighted_features`` (weighted KJT, or None when the
        schema has no weighted field), ``dense`` (``[B, D]`` transformed dense features, or None when the
        schema has none) -> ``p_ctr, p_cvr, p_ctcvr, p_ctnocvr`` ``[B]``."""
        return self.head.predict(self.task_logits(self.representation(features, weighted_features, dense)))

    @classmethod
    def from_config(cls, sparse_arch: FieldEmbedding, head: CvrObjective, model_cfg: ModelConfig,
                    device: torch.device | None = None,
                    dense_arch: DenseFeatureArch | None = None) -> MultiTaskRanker:
        """The backbone with ``model_cfg``'s sizes (each backbone reads its own fields)."""
        raise NotImplementedError


class ESMM(MultiTaskRanker):
    """ESMM (Ma et al. 2018): one tower per task on the shared embedding; pCTCVR = pCTR·pCVR.

    Base trains on CTR + CTCVR (entire space; CVR is an intermediate variable). +CTnoCVR adds the
    derived pCTnoCVR = pCTR·(1 − pCVR) term.
    """

    base_weights = {"ctr": "loss_weight_ctr", "ctcvr": "loss_weight_ctcvr"}
    ctnocvr_mode = "derived"

    def __init__(
        self,
        sparse_arch: FieldEmbedding,
        head: CvrObjective,
        tower_hidden: Sequence[int] = (300, 200, 80),
        dropout: float = 0.0,
        device: torch.device | None = None,
        dense_arch: DenseFeatureArch | None = None,
    ) -> None:
        super().__init__(sparse_arch, head, dense_arch)
        width = self.input_dim
        self.towers = nn.ModuleDict({t: TaskTower(width, tower_hidden, dropout, device) for t in self.tasks})

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        # [T, B] transposed to [B, T]: each task's column is then a contiguous row of the stack, so the
        # towers' backward sees the same gradient layout (and float summation order) as separate towers
        return torch.stack([self.towers[t](x) for t in self.tasks], dim=0).t()

    @classmethod
    def from_config(cls, sparse_arch: FieldEmbedding, head: CvrObjective, model_cfg: ModelConfig,
                    device: torch.device | None = None, dense_arch: DenseFeatureArch | None = None) -> ESMM:
        return cls(sparse_arch, head, list(model_cfg.tower_hidden), model_cfg.dropout, device, dense_arch)


class GatedRanker(MultiTaskRanker):
    """Experts + one gate and tower per task (MMoE / CGC / PLE share this; only the experts differ).

    Base: tasks CTR, CVR (losses CTR + clicked-only CVR). +CTnoCVR: a third task with its own gate
    and tower, its loss, and the ω score term (when ``score_weight > 0``). Methods with own towers
    (ESCM²-DR's imputation, DCMT's counterfactual CVR) get their own gate and tower the same way.
    """

    base_weights = {"ctr": "loss_weight_ctr", "cvr": "loss_weight_cvr"}
    ctnocvr_mode = "tower"

    def __init__(
        self,
        sparse_arch: FieldEmbedding,
        head: CvrObjective,
        num_task_experts: int,
        num_shared_experts: int,
        num_levels: int,
        expert_hidden: Sequence[int] = (16,),
        tower_hidden: Sequence[int] = (300, 200, 80),
        dropout: float = 0.0,
        device: torch.device | None = None,
        dense_arch: DenseFeatureArch | None = None,
    ) -> None:
        super().__init__(sparse_arch, head, dense_arch)
        self.over_arch = MultiTaskOverArch(
            self.input_dim,
            num_tasks=len(self.tasks),
            num_task_experts=num_task_experts,
            num_shared_experts=num_shared_experts,
            expert_hidden=expert_hidden,
            num_levels=num_levels,
            tower_hidden=tower_hidden,
            dropout=dropout,
            device=device,
        )

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.over_arch(x)  # [B, T]; column order = self.tasks

    @staticmethod
    def _common(model_cfg: ModelConfig, device: torch.device | None,
                dense_arch: DenseFeatureArch | None) -> dict[str, Any]:
        return {"expert_hidden": list(model_cfg.expert_hidden), "tower_hidden": list(model_cfg.tower_hidden),
                "dropout": model_cfg.dropout, "device": device, "dense_arch": dense_arch}


class MMoE(GatedRanker):
    """MMoE (Ma et al. 2018): ``num_experts`` shared experts, one softmax gate per task."""

    def __init__(self, sparse_arch: FieldEmbedding, head: CvrObjective, num_experts: int = 8, **kwargs: Any) -> None:
        super().__init__(sparse_arch, head, num_task_experts=0, num_shared_experts=num_experts, num_levels=1,
                         **kwargs)

    @classmethod
    def from_config(cls, sparse_arch: FieldEmbedding, head: CvrObjective, model_cfg: ModelConfig,
                    device: torch.device | None = None, dense_arch: DenseFeatureArch | None = None) -> MMoE:
        return cls(sparse_arch, head, model_cfg.num_experts, **cls._common(model_cfg, device, dense_arch))


class CGC(GatedRanker):
    """CGC (Tang et al. 2020; paper Fig. 1): ``m_k`` experts per task + ``m_s`` shared, eqs. 3-4."""

    def __init__(self, sparse_arch: FieldEmbedding, head: CvrObjective, num_task_experts: int = 4,
                 num_shared_experts: int = 4, **kwargs: Any) -> None:
        super().__init__(sparse_arch, head, num_task_experts, num_shared_experts, num_levels=1, **kwargs)

    @classmethod
    def from_config(cls, sparse_arch: FieldEmbedding, head: CvrObjective, model_cfg: ModelConfig,
                    device: torch.device | None = None, dense_arch: DenseFeatureArch | None = None) -> CGC:
        return cls(sparse_arch, head, model_cfg.num_task_experts, model_cfg.num_shared_experts,
                   **cls._common(model_cfg, device, dense_arch))


class PLE(GatedRanker):
    """PLE (Tang et al. 2020): ``num_levels`` stacked CGC levels, shared gates between levels."""

    def __init__(
        self,
        sparse_arch: FieldEmbedding,
        head: CvrObjective,
        num_task_experts: int = 4,
        num_shared_experts: int = 4,
        num_levels: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(sparse_arch, head, num_task_experts, num_shared_experts, num_levels=num_levels, **kwargs)

    @classmethod
    def from_config(cls, sparse_arch: FieldEmbedding, head: CvrObjective, model_cfg: ModelConfig,
                    device: torch.device | None = None, dense_arch: DenseFeatureArch | None = None) -> PLE:
        return cls(sparse_arch, head, model_cfg.num_task_experts, model_cfg.num_shared_experts,
                   model_cfg.num_levels, **cls._common(model_cfg, device, dense_arch))


