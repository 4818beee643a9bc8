"""Configuration files shipped inside the package, and how a name or a path finds one.

Everything under ``ctnocvr_rec/configs/`` is package data (``importlib.resources``), so the installed
``ctnocvr`` works from any working directory:

=============  ==================================  =====================================
kind           packaged folder                     named by
=============  ==================================  =====================================
``run``        ``configs/*.yaml``                  ``ctnocvr train -c mmoe``, ``plan -c``, ``eval``
``fields``     ``configs/fields/*.yaml``           ``data.schema: aliccp``, ``--schema aliccp``
``experiment`` ``configs/experiments/*.yaml``      ``ctnocvr experiment table3 --config synth_preset``
``preset``     ``configs/presets/*.yaml``          ``ctnocvr plan --preset aliccp-full``
=============  ==================================  =====================================

Resolution rule of :func:`resolve` (one rule for every kind and every caller):

1. an existing file wins: ``ref`` relative to ``base_dir`` (the folder of the YAML file that holds the
   reference, when there is one), else relative to the working directory, else absolute;
2. otherwise a bare name (``mmoe``, ``mmoe.yaml``; for presets ``aliccp-full`` = ``aliccp_full``) is
   the packaged file of that kind;
3. otherwise a path of the old repository layout ``configs/<...>.yaml`` (before the files moved into
   the package) is the packaged file at ``<...>``, so existing command lines and saved run configs
   keep working;
4. otherwise :class:`FileNotFoundError` naming ``ref``, where it looked and the packaged names.

Example::

    >>> resolve("fields", "aliccp").name
    'aliccp.yaml'
    >>> packaged_names("run")[:3]
    ['aliccp_paper_cgc', 'aliccp_paper_esmm', 'aliccp_paper_mmoe']
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.resources
from pathlib import Path

#: kind -> sub-folder of ``ctnocvr_rec/configs`` ("" = the folder itself)
KINDS: dict[str, str] = {"run": "", "fields": "fields", "experiment": "experiments", "preset": "presets"}
#: the folder name of the repository layout before the configs moved into the package
LEGACY_PREFIX = "configs"

_extracted = contextlib.ExitStack()  # only used when the package is not on a file system (zip)
atexit.register(_extracted.close)
_root: Path | None = None


def configs_root() -> Path:
    """The packaged ``ctnocvr_rec/configs`` folder as a file-system path."""
    global _root
    if _root is None:
        root = importlib.resources.files("ctnocvr_rec") / "configs"
        if isinstance(root, Path):
            _root = root
        else:  # e.g. a zipped install: extract once for the life of the process
            _root = Path(_extracted.enter_context(importlib.resources.as_file(root)))
    return _root


def packaged_dir(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of packaged file {kind!r}; kinds: {sorted(KINDS)}")
    return configs_root() / KINDS[kind] if KINDS[kind] else configs_root()


def packaged_names(kind: str) -> list[str]:
    """Names of the packaged files of ``kind`` (file stems; presets spelt with ``-``)."""
    stems = sorted(p.stem for p in packaged_dir(kind).glob("*.yaml"))
    return [s.replace("_", "-") for s in stems] if kind == "preset" else stems


def _packaged(kind: str, name: str) -> Path | None:
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if kind == "preset":
        stem = stem.replace("-", "_")
    path = packaged_dir(kind) / f"{stem}.yaml"
    return path if path.is_file() else None


def _legacy(ref: str) -> Path | None:
    parts = Path(ref).parts
    if len(parts) >= 2 and parts[0] == LEGACY_PREFIX:
        path = configs_root().joinpath(*parts[1:])
        if path.is_file():
            return path
    return None


def resolve(kind: str, ref: str | Path, base_dir: str | Path | None = None) -> Path:
    """The file ``ref`` names: an existing path, else a packaged file (module docstring, steps 1-4)."""
    text = str(ref)
    if not text:
        raise FileNotFoundError(f"empty {kind} file name; packaged: {', '.join(packaged_names(kind))}")
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [*([Path(base_dir) / path] if base_dir else []), path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    bare = len(path.parts) == 1
    found = (_packaged(kind, text) if bare else None) or _legacy(text)
    if found is not None:
        return found
    where = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"{text}: no such file ({where}) and no packaged {kind} file of that name; "
        f"packaged: {', '.join(packaged_names(kind))}"
    )
