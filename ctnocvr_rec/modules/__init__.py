"""Drop-in TorchRec modules: field embeddings (EBC), the dense-feature arch, expert layers, towers, the CTnoCVR head and the
CVR objectives (base, ESCM²-IPS/DR, DCMT, ChorusCVR)."""

from ctnocvr_rec.modules.choruscvr import ChorusCvrObjective
from ctnocvr_rec.modules.ctnocvr_head import CtnocvrHead, bce_from_log_prob, log1mexp, masked_mean
from ctnocvr_rec.modules.cvr_objective import BaseObjective, CvrObjective
from ctnocvr_rec.modules.dcmt import DcmtObjective
from ctnocvr_rec.modules.dense_arch import DenseFeatureArch
from ctnocvr_rec.modules.escm2_dr import Escm2DrObjective
from ctnocvr_rec.modules.escm2_ips import Escm2IpsObjective
from ctnocvr_rec.modules.experts import ExpertExtraction, ExtractionLevel
from ctnocvr_rec.modules.field_embedding import GROUP_ORDER, FieldEmbedding, physical_dim
from ctnocvr_rec.modules.towers import MultiTaskOverArch, TaskTower

__all__ = [
    "GROUP_ORDER",
    "BaseObjective",
    "ChorusCvrObjective",
    "CtnocvrHead",
    "CvrObjective",
    "DcmtObjective",
    "DenseFeatureArch",
    "Escm2DrObjective",
    "Escm2IpsObjective",
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
