"""The rankers of the paper's Table 3: ESMM, MMoE, CGC, PLE, each Base or +CTnoCVR by one flag.

Every ranker is ``sparse_arch`` (:class:`FieldEmbedding`, the unweighted and weighted EBCs) -> dense
task logits ->
:class:`CtnocvrHead`. ``forward(batch)`` returns ``(loss, outputs)`` as ``TrainPipelineSparseDist``
expects (see ``docs/design.md``, "Model contract"); ``outputs`` are detached.

=========  ====================================  ==================================================
model      Base (``use_ctnocvr=False``)           +CTnoCVR (``use_ctnocvr=True``)
=========  ====================================  ==================================================
ESMM       CTR + CTCVR losses (Ma et al. 2018);   adds λ_ctnocvr·BCE(c, pCTR·(1−pCVR)) (eq. 2)
           towers read the shared embedding
MMoE       CTR + clicked-only CVR; shared         third task: own tower, own gate, + ω score term
           experts, a softmax gate per task
CGC        as MMoE with task-specific + shared    as MMoE
           experts (eqs. 3-4)
PLE        stacked CGC levels with shared gates   as MMoE
=========  ====================================  ==================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctnocvr_rec.config import ModelConfig
from ctnocvr_rec.data.batch import CtnocvrBatch
from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.modules.ctnocvr_head import CtnocvrHead
from ctnocvr_rec.modules.field_embedding import FieldEmbedding
from ctnocvr_rec.modules.towers import MultiTaskOverArch, TaskTower

ARCHS = ("esmm", "mmoe", "cgc", "ple")


class MultiTaskRanker(nn.Module):
    """Shared skeleton: embed, compute task logits (subclass), apply the head, pass labels/ids through.

    Call: ``batch`` (:class:`CtnocvrBatch`, B rows) -> ``(loss, outputs)``; ``outputs`` holds ``p_ctr,
    p_cvr, p_ctcvr, p_ctnocvr`` ``[B]``, ``loss`` and ``loss_<term>`` scalars and the batch's
    ``click, conversion, ctnocvr, sample_id, request_id, user_id`` ``[B]``, all detached.
    """

    #: task names in tower order
    tasks: tuple[str, ...]

    def __init__(self, sparse_arch: FieldEmbedding, head: CtnocvrHead) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        self.head = head

    def task_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``x`` ``[B, D]`` -> (CTR logit, CVR logit, CTnoCVR logit or None), each ``[B]``."""
        raise NotImplementedError

    def forward(self, batch: CtnocvrBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # both KJTs straight from the batch: the pipeline's fx trace must see each sharded EBC fed by a
        # getattr on the batch to pipeline its input distribution
        x = self.sparse_arch(batch.sparse_features, batch.weighted_features)
        ctr_logit, cvr_logit, ctnocvr_logit = self.task_logits(x)
        loss, head_out = self.head(ctr_logit, cvr_logit, ctnocvr_logit, batch.click, batch.conversion, batch.ctnocvr)
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
        self, features: KeyedJaggedTensor, weighted_features: KeyedJaggedTensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Inference: ``features`` (unweighted KJT), ``weighted_features`` (weighted KJT, or None when the
        schema has no weighted field) -> ``p_ctr, p_cvr, p_ctcvr, p_ctnocvr`` ``[B]``."""
        return self.head.predict(*self.task_logits(self.sparse_arch(features, weighted_features)))


class ESMM(MultiTaskRanker):
    """ESMM (Ma et al. 2018): CTR and CVR towers on the shared embedding; pCTCVR = pCTR·pCVR.

    Base trains on CTR + CTCVR (entire space; CVR is an intermediate variable). +CTnoCVR adds the
    derived pCTnoCVR = pCTR·(1 − pCVR) term.
    """

    def __init__(
        self,
        sparse_arch: FieldEmbedding,
        use_ctnocvr: bool = True,
        tower_hidden: Sequence[int] = (300, 200, 80),
        dropout: float = 0.0,
        loss_weight_ctr: float = 1.0,
        loss_weight_ctcvr: float = 1.0,
        loss_weight_ctnocvr: float = 1.0,
        device: torch.device | None = None,
    ) -> None:
        weights = {"ctr": loss_weight_ctr, "ctcvr": loss_weight_ctcvr}
        if use_ctnocvr:
            weights["ctnocvr"] = loss_weight_ctnocvr
        super().__init__(sparse_arch, CtnocvrHead("derived" if use_ctnocvr else "none", weights))
        self.tasks = ("ctr", "cvr")
        width = sparse_arch.output_dim
        self.towers = nn.ModuleDict({t: TaskTower(width, tower_hidden, dropout, device) for t in self.tasks})

    def task_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.towers["ctr"](x), self.towers["cvr"](x), None


class GatedRanker(MultiTaskRanker):
    """Experts + one gate and tower per task (MMoE / CGC / PLE share this; only the experts differ).

    Base: tasks CTR, CVR (losses CTR + clicked-only CVR). +CTnoCVR: a third task with its own gate
    and tower, its loss, and the ω score term (when ``score_weight > 0``).
    """

    def __init__(
        self,
        sparse_arch: FieldEmbedding,
        num_task_experts: int,
        num_shared_experts: int,
        num_levels: int,
        use_ctnocvr: bool = True,
        expert_hidden: Sequence[int] = (16,),
        tower_hidden: Sequence[int] = (300, 200, 80),
        dropout: float = 0.0,
        loss_weight_ctr: float = 1.0,
        loss_weight_cvr: float = 0.5,
        loss_weight_ctnocvr: float = 1.0,
        score_weight: float = 0.01,
        device: torch.device | None = None,
    ) -> None:
        weights = {"ctr": loss_weight_ctr, "cvr": loss_weight_cvr}
        if use_ctnocvr:
            weights["ctnocvr"] = loss_weight_ctnocvr
            if score_weight > 0:
                weights["score"] = score_weight
        super().__init__(sparse_arch, CtnocvrHead("tower" if use_ctnocvr else "none", weights))
        self.tasks = ("ctr", "cvr", "ctnocvr") if use_ctnocvr else ("ctr", "cvr")
        self.use_ctnocvr = use_ctnocvr
        self.over_arch = MultiTaskOverArch(
            sparse_arch.output_dim,
            num_tasks=len(self.tasks),
            num_task_experts=num_task_experts,
            num_shared_experts=num_shared_experts,
            expert_hidden=expert_hidden,
            num_levels=num_levels,
            tower_hidden=tower_hidden,
            dropout=dropout,
            device=device,
        )

    def task_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits = self.over_arch(x)  # [B, T]; column order = self.tasks
        ctnocvr = logits[:, 2] if self.use_ctnocvr else None
        return logits[:, 0], logits[:, 1], ctnocvr


class MMoE(GatedRanker):
    """MMoE (Ma et al. 2018): ``num_experts`` shared experts, one softmax gate per task."""

    def __init__(self, sparse_arch: FieldEmbedding, num_experts: int = 8, **kwargs: Any) -> None:
        super().__init__(sparse_arch, num_task_experts=0, num_shared_experts=num_experts, num_levels=1, **kwargs)


class CGC(GatedRanker):
    """CGC (Tang et al. 2020; paper Fig. 1): ``m_k`` experts per task + ``m_s`` shared, eqs. 3-4."""

    def __init__(
        self, sparse_arch: FieldEmbedding, num_task_experts: int = 4, num_shared_experts: int = 4, **kwargs: Any
    ) -> None:
        super().__init__(sparse_arch, num_task_experts, num_shared_experts, num_levels=1, **kwargs)


class PLE(GatedRanker):
    """PLE (Tang et al. 2020): ``num_levels`` stacked CGC levels, shared gates between levels."""

    def __init__(
        self,
        sparse_arch: FieldEmbedding,
        num_task_experts: int = 4,
        num_shared_experts: int = 4,
        num_levels: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(sparse_arch, num_task_experts, num_shared_experts, num_levels=num_levels, **kwargs)


def build_model(
    model_cfg: ModelConfig,
    schema: FieldSchema,
    num_embeddings: Mapping[str, int],
    device: torch.device | None = None,
) -> MultiTaskRanker:
    """Build the ranker ``model_cfg.arch`` (esmm | mmoe | cgc | ple) over ``schema``.

    ``device`` defaults to ``meta``: the planner places the EBCs and ``DistributedModelParallel``
    materialises everything (dense parameters are re-initialised by their ``reset_parameters``).
    Pass ``torch.device("cpu")`` for an unsharded model.
    """
    device = torch.device("meta") if device is None else torch.device(device)
    arch = model_cfg.arch.lower()
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {model_cfg.arch!r}")
    sparse_arch = FieldEmbedding(
        schema,
        num_embeddings,
        embedding_dim=model_cfg.embedding_dim,
        field_embedding_dims=model_cfg.field_embedding_dims,
        device=device,
    )
    common = {
        "use_ctnocvr": model_cfg.use_ctnocvr,
        "tower_hidden": list(model_cfg.tower_hidden),
        "dropout": model_cfg.dropout,
        "loss_weight_ctr": model_cfg.loss_weight_ctr,
        "loss_weight_ctnocvr": model_cfg.loss_weight_ctnocvr,
        "device": device,
    }
    if arch == "esmm":
        return ESMM(sparse_arch, loss_weight_ctcvr=model_cfg.loss_weight_ctcvr, **common)
    gated = {
        **common,
        "expert_hidden": list(model_cfg.expert_hidden),
        "loss_weight_cvr": model_cfg.loss_weight_cvr,
        "score_weight": model_cfg.score_weight,
    }
    if arch == "mmoe":
        return MMoE(sparse_arch, num_experts=model_cfg.num_experts, **gated)
    if arch == "cgc":
        return CGC(sparse_arch, model_cfg.num_task_experts, model_cfg.num_shared_experts, **gated)
    return PLE(sparse_arch, model_cfg.num_task_experts, model_cfg.num_shared_experts, model_cfg.num_levels, **gated)
