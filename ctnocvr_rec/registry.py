"""The one list of backbones and CVR objectives (methods): names, titles, where the code is.

Adding a backbone or a method is one file + one line here (+ one typed config section in
``ctnocvr_rec/config.py`` for a method with settings). Everything else derives from this module:
``model.arch`` / ``model.method`` validation and ``build_model`` (``models/build.py``), the loss terms
the trainer logs (``train/loop.py``), and the experiments' grids and table titles.

This module imports no torch: the experiment reports read names and titles from it. Classes are
named by ``"module:Class"`` and imported on first use (:func:`load`).

Conventions a new entry follows:

* a backbone class (``models/``) has ``from_config(sparse_arch, objective, model_cfg, device,
  dense_arch=None)`` (its layers read ``MultiTaskRanker.input_dim`` columns: the pooled embeddings and,
  with dense features, the dense arch's block),
  ``base_weights`` (term -> ``ModelConfig`` field of the ``base`` objective on that backbone) and
  ``ctnocvr_mode`` (``"derived"`` or ``"tower"``: how ``use_ctnocvr`` adds the CTnoCVR task);
* a method class (``modules/``) is a :class:`~ctnocvr_rec.modules.cvr_objective.CvrObjective`
  (``extra_tasks``, ``method_terms``); its config section (``ModelConfig.<section>``) holds one
  ``<term>_weight`` per loss term except ``ctr`` (``model.loss_weight_ctr``), the other fields being
  keyword arguments of the class.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    title: str
    factory: str  # "module:Class"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str
    factory: str  # "module:Class"
    section: str = ""  # ModelConfig field with the method's settings ("" = none)
    paper: str = ""


BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in (
    BackboneSpec("esmm", "ESMM", "ctnocvr_rec.models.rankers:ESMM"),
    BackboneSpec("mmoe", "MMoE", "ctnocvr_rec.models.rankers:MMoE"),
    BackboneSpec("cgc", "CGC", "ctnocvr_rec.models.rankers:CGC"),
    BackboneSpec("ple", "PLE", "ctnocvr_rec.models.rankers:PLE"),
)}

METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("base", "Base", "ctnocvr_rec.modules.cvr_objective:BaseObjective", "",
               "the backbone's own objective (ESMM: CTR + CTCVR; gated: CTR + clicked CVR)"),
    MethodSpec("escm2_ips", "ESCM²-IPS", "ctnocvr_rec.modules.escm2_ips:Escm2IpsObjective", "escm2_ips",
               "Wang et al., SIGIR '22"),
    MethodSpec("escm2_dr", "ESCM²-DR", "ctnocvr_rec.modules.escm2_dr:Escm2DrObjective", "escm2_dr",
               "Wang et al., SIGIR '22"),
    MethodSpec("dcmt", "DCMT", "ctnocvr_rec.modules.dcmt:DcmtObjective", "dcmt", "Zhu et al., ICDE '23"),
    MethodSpec("choruscvr", "ChorusCVR", "ctnocvr_rec.modules.choruscvr:ChorusCvrObjective", "choruscvr",
               "arXiv 2502.08277 (our reading: modules/choruscvr.py)"),
)}

ARCHS: tuple[str, ...] = tuple(BACKBONES)
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def backbone(name: str) -> BackboneSpec:
    key = name.lower()
    if key not in BACKBONES:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {name!r}")
    return BACKBONES[key]


def method(name: str) -> MethodSpec:
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"model.method must be one of {METHOD_NAMES}, got {name!r}")
    return METHODS[key]


def load(factory: str) -> Any:
    """The object named ``"package.module:Name"``."""
    module, _, attr = factory.partition(":")
    return getattr(importlib.import_module(module), attr)


def variant_name(method_name: str, use_ctnocvr: bool) -> str:
    """Run label of a (method, +CTnoCVR flag) pair: ``base``, ``ctnocvr`` (the paper), ``dcmt``,
    ``dcmt+ctnocvr``, ..."""
    if method_name == "base":
        return "ctnocvr" if use_ctnocvr else "base"
    return f"{method_name}+ctnocvr" if use_ctnocvr else method_name


def variant_title(method_name: str, use_ctnocvr: bool) -> str:
    """Table title of a variant: ``Base``, ``+CTnoCVR``, ``DCMT``, ``DCMT +CTnoCVR``."""
    if method_name == "base":
        return "+CTnoCVR" if use_ctnocvr else "Base"
    title = METHODS[method_name].title if method_name in METHODS else method_name
    return f"{title} +CTnoCVR" if use_ctnocvr else title


def loss_term_names() -> tuple[str, ...]:
    """Every loss term any method can report, in a stable order (imports the method classes)."""
    from ctnocvr_rec.modules.cvr_objective import CTNOCVR_TERMS

    names: list[str] = []
    for spec in METHODS.values():
        for term in (*load(spec.factory).method_terms, *CTNOCVR_TERMS):
            if term not in names:
                names.append(term)
    return tuple(names)
