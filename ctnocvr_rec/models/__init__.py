"""Rankers ESMM / MMoE / CGC / PLE and ``build_model`` (the model contract of docs/design.md)."""

from ctnocvr_rec.models.build import build_model, build_objective
from ctnocvr_rec.models.rankers import (
    CGC,
    ESMM,
    PLE,
    GatedRanker,
    MMoE,
    MultiTaskRanker,
)
from ctnocvr_rec.registry import ARCHS, METHOD_NAMES

__all__ = [
    "ARCHS",
    "CGC",
    "ESMM",
    "METHOD_NAMES",
    "MMoE",
    "PLE",
    "GatedRanker",
    "MultiTaskRanker",
    "build_model",
    "build_objective",
]
