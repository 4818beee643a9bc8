"""TEMPORARY stand-in for the writer helper's base.py (FORMATS_INTERFACE.md); replaced at merge."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ctnocvr_rec.data.shards import FieldValues


class PrepareError(ValueError):
    pass


@dataclass(frozen=True)
class Reject:
    file: str
    row: int
    reason: str
    detail: str
    raw: str


@dataclass
class RawRows:
    file: str
    rows: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    sparse: dict[str, FieldValues]
    dense: dict[str, np.ndarray]
    user_id: np.ndarray | None = None
    request_id: np.ndarray | None = None
    rejects: list[Reject] = field(default_factory=list)


def stable_id_hash(values) -> np.ndarray:
    out = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        out[i] = int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little", signed=True)
    return out
