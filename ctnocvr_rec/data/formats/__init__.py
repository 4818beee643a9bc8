"""Input formats of ``ctnocvr data prepare --format NAME`` (reader interface: :mod:`.base`).

Adding a format = one reader module here with a module-level ``FORMAT`` (an
:class:`~ctnocvr_rec.data.formats.base.InputFormat`), its tests, and ONE line in :data:`_MODULES`
below. ``aliccp-raw`` (the official raw files, the default) is handled by
:mod:`ctnocvr_rec.data.prepare`. See ``docs/formats.md``.
"""

from __future__ import annotations

import importlib

from ctnocvr_rec.data.formats.base import InputFormat

#: reader modules, one line per format (module name inside this package)
_MODULES = (
    "aliccp_rechub_csv",
    "aliccp_aitm_csv",
    "table",
)


def _load(module: str) -> InputFormat:
    return importlib.import_module(f"{__name__}.{module}").FORMAT


#: registry key (``--format``) -> format
FORMATS: dict[str, InputFormat] = {fmt.name: fmt for fmt in map(_load, _MODULES)}
