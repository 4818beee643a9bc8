"""Serving: ``ctnocvr export`` (checkpoint -> programs + serving.json), ``ctnocvr predict`` and :class:`Scorer`.

``from ctnocvr_rec.serving import Scorer`` imports only ``scorer.py`` and ``contract.py`` (no training
code). The import is lazy so that ``ctnocvr --help`` (which imports ``serving.commands``) stays free
of torch.
"""

from typing import Any

__all__ = ["Scorer"]


def __getattr__(name: str) -> Any:
    if name == "Scorer":
        from ctnocvr_rec.serving.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'ctnocvr_rec.serving' has no attribute {name!r}")
