"""Input formats of ``ctnocvr data prepare --format NAME`` (reader interface: :mod:`.base`).

Adding a format = one reader module here with a module-level ``FORMAT`` (an
:class:`~ctnocvr_rec.data.formats.base.InputFormat`), its tests, and ONE line in :data:`_MODULES`
below. See ``docs/formats.md``.

:data:`FORMATS` is built on first use (``from ctnocvr_rec.data.formats import FORMATS``), so importing
this package -- e.g. for :mod:`.base` -- loads no reader.
"""

from __future__ import annotations

import importlib
from typing import Any

#: reader modules, one line per format (module name inside this package); the first is the default
_MODULES = (
    "aliccp_raw",
    "aliccp_rechub_csv",
    "aliccp_aitm_csv",
    "table",
)

_registry: dict[str, Any] | None = None


def _formats() -> dict[str, Any]:
    global _registry
    if _registry is None:
        loaded = [importlib.import_module(f"{__name__}.{module}").FORMAT for module in _MODULES]
        _registry = {fmt.name: fmt for fmt in loaded}
    return _registry


def __getattr__(name: str) -> Any:
    if name == "FORMATS":  # registry key (``--format``) -> InputFormat
        return _formats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
