"""Drop-in TorchRec modules: field embeddings (EBC), expert layers, towers and the CTnoCVR head."""

from ctnocvr_rec.modules.ctnocvr_head import CtnocvrHead, bce_from_log_prob, log1mexp, masked_mean
from ctnocvr_rec.modules.experts import ExpertExtraction, ExtractionLevel
from ctnocvr_rec.modules.field_embedding import GROUP_ORDER, FieldEmbedding, physical_dim
from ctnocvr_rec.modules.towers import MultiTaskOverArch, TaskTower

__all__ = [
    "GROUP_ORDER",
    "CtnocvrHead",
    "ExpertExtraction",
    "ExtractionLevel",
    "FieldEmbedding",
    "MultiTaskOverArch",
    "TaskTower",
    "bce_from_log_prob",
    "log1mexp",
    "masked_mean",
    "physical_dim",
]
