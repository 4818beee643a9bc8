"""Rankers ESMM / MMoE / CGC / PLE and ``build_model`` (the model contract of docs/design.md)."""

from ctnocvr_rec.models.rankers import (
    ARCHS,
    CGC,
    ESMM,
    PLE,
    GatedRanker,
    MMoE,
    MultiTaskRanker,
    build_model,
)

__all__ = [
    "ARCHS",
    "CGC",
    "ESMM",
    "MMoE",
    "PLE",
    "GatedRanker",
    "MultiTaskRanker",
    "build_model",
]
