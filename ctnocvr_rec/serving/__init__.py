"""Serving: ``ctnocvr export`` (checkpoint -> programs + serving.json), ``ctnocvr predict`` and :class:`Scorer`.

``from ctnocvr_rec.serving import Scorer`` imports only ``scorer.py`` and ``contract.py`` (no training
code); the exporter (``export.py``, ``program.py``) is imported by the commands.
"""

from ctnocvr_rec.serving.scorer import Scorer

__all__ = ["Scorer"]
