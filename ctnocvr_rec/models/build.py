"""``build_model``: a backbone and a CVR objective from the registry, configured by ``ModelConfig``.

No per-backbone or per-method code here: the backbone class comes from ``model.arch``, the
objective class from ``model.method`` (both via ``ctnocvr_rec/registry.py``), and the objective's
loss weights from the conventions stated there:

* ``base``: the backbone's ``base_weights`` (e.g. ESMM: ``ctr``, ``ctcvr``);
* any other method: ``ctr`` = ``model.loss_weight_ctr`` and one ``<term>_weight`` per term in the
  method's section ``model.<section>``; the section's other fields are the class's keyword args;
* ``use_ctnocvr``: + ``ctnocvr`` = ``model.loss_weight_ctnocvr`` and, on tower backbones,
  ``score`` = ``model.score_weight`` (when > 0), in the backbone's ``ctnocvr_mode``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ctnocvr_rec import registry
from ctnocvr_rec.config import ModelConfig
from ctnocvr_rec.data.schema import FieldSchema
from ctnocvr_rec.models.rankers import MultiTaskRanker
from ctnocvr_rec.modules.cvr_objective import CvrObjective
from ctnocvr_rec.modules.dense_arch import DenseFeatureArch
from ctnocvr_rec.modules.field_embedding import FieldEmbedding

WEIGHT_SUFFIX = "_weight"


def objective_arguments(model_cfg: ModelConfig, backbone_cls: type[MultiTaskRanker]) -> dict[str, Any]:
    """Keyword arguments of the objective class of ``model_cfg.method`` on ``backbone_cls``."""
    spec = registry.method(model_cfg.method)
    objective_cls = registry.load(spec.factory)
    if spec.section:
        section = dataclasses.asdict(getattr(model_cfg, spec.section))
        weights = {"ctr": model_cfg.loss_weight_ctr}
        kwargs: dict[str, Any] = {}
        for key, value in section.items():
            term = key.removesuffix(WEIGHT_SUFFIX)
            if key.endswith(WEIGHT_SUFFIX) and term in objective_cls.method_terms:
                weights[term] = value
            else:
                kwargs[key] = value
    else:
        weights = {term: getattr(model_cfg, field) for term, field in backbone_cls.base_weights.items()}
        kwargs = {}
    mode = "none"
    if model_cfg.use_ctnocvr:
        mode = backbone_cls.ctnocvr_mode
        weights["ctnocvr"] = model_cfg.loss_weight_ctnocvr
        if mode == "tower" and model_cfg.score_weight > 0:
            weights["score"] = model_cfg.score_weight
    return {"loss_weights": weights, "ctnocvr": mode, **kwargs}


def build_objective(model_cfg: ModelConfig, backbone_cls: type[MultiTaskRanker]) -> CvrObjective:
    """The objective ``model_cfg.method`` (+ CTnoCVR when ``use_ctnocvr``) for ``backbone_cls``."""
    objective_cls = registry.load(registry.method(model_cfg.method).factory)
    return objective_cls(**objective_arguments(model_cfg, backbone_cls))


def build_model(
    model_cfg: ModelConfig,
    schema: FieldSchema,
    num_embeddings: Mapping[str, int],
    device: torch.device | None = None,
) -> MultiTaskRanker:
    """Build the ranker ``model_cfg.arch`` (esmm | mmoe | cgc | ple) trained by ``model_cfg.method``.

    A schema with dense features (``schema.dense``) adds a :class:`DenseFeatureArch` of
    ``model_cfg.dense_hidden`` layers ending in ``model_cfg.embedding_dim`` columns (one more field's
    width), concatenated after the pooled embeddings; a sparse-only schema gets none.

    ``device`` defaults to ``meta``: the planner places the EBCs and ``DistributedModelParallel``
    materialises everything (dense parameters are re-initialised by their ``reset_parameters``).
    Pass ``torch.device("cpu")`` for an unsharded model.
    """
    device = torch.device("meta") if device is None else torch.device(device)
    backbone_cls = registry.load(registry.backbone(model_cfg.arch).factory)
    objective = build_objective(model_cfg, backbone_cls)
    sparse_arch = FieldEmbedding(
        schema,
        num_embeddings,
        embedding_dim=model_cfg.embedding_dim,
        field_embedding_dims=model_cfg.field_embedding_dims,
        device=device,
    )
    # built only for a schema with dense features (and before the backbone's layers): a sparse-only
    # model draws the same random numbers, so has the same initial weights, as before dense features
    dense_arch = (
        DenseFeatureArch(len(schema.dense), model_cfg.dense_hidden, out_features=model_cfg.embedding_dim, device=device)
        if schema.dense else None
    )
    return backbone_cls.from_config(sparse_arch, objective, model_cfg, device, dense_arch=dense_arch)
