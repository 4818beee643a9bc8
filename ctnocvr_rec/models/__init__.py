"""Rankers ESMM / MMoE / CGC / PLE and ``build_model`` (the model contract of docs/design.md)."""

from ctnocvr_rec.models.rankers import (
    ARCHS,
    CGC,
    ESMM,
    PLE,
    GatedRanker,
    MMoE,
    MultiTaskRanker,
    RankerForInference,
    build_model,
    export_for_inference,
)

__all__ = [
    "ARCHS",
    "CGC",
    "ESMM",
    "MMoE",
    "PLE",
    "GatedRanker",
    "MultiTaskRanker",
    "RankerForInference",
    "build_model",
    "export_for_inference",
]
