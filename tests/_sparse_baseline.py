"""Fixed-seed fingerprint of every ranker on the sparse-only tiny schema (state_dict keys/shapes and
the losses of a few Adam steps): ``tests/data/sparse_only_baseline.json`` was written by running this
module on main *before* dense features existed (commit 985806d); ``tests/test_dense_features.py``
recomputes it and demands the same keys, shapes and losses, so sparse-only models behave as before.

Regenerate (only when a deliberate change of sparse-only models is made)::

    PYTHONPATH=$PWD python tests/_sparse_baseline.py > tests/data/sparse_only_baseline.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from ctnocvr_rec.models import build_model
from ctnocvr_rec.models.testing import TINY_SIZES, SyntheticStream, tiny_model_config, tiny_schema

#: (arch, method, use_ctnocvr): every backbone, every method on one backbone and the paper's setting
CASES: tuple[tuple[str, str, bool], ...] = (
    ("esmm", "base", False), ("esmm", "base", True), ("mmoe", "base", False), ("mmoe", "base", True),
    ("cgc", "base", True), ("ple", "base", True), ("mmoe", "escm2_ips", True), ("mmoe", "escm2_dr", True),
    ("ple", "dcmt", False), ("esmm", "dcmt", True),
)
STEPS = 3


def fingerprint(arch: str, method: str, use_ctnocvr: bool, schema: Any = None, sizes: Any = None,
                stream: Any = None) -> dict[str, Any]:
    schema = schema if schema is not None else tiny_schema()
    sizes = sizes if sizes is not None else TINY_SIZES
    torch.manual_seed(1234)
    model = build_model(tiny_model_config(arch, use_ctnocvr, method=method), schema, sizes,
                        device=torch.device("cpu"))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    stream = stream if stream is not None else SyntheticStream(schema, sizes, batch_size=64, seed=5)
    losses = []
    for _ in range(STEPS):
        loss, _ = model(stream.next_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"state_dict": shapes, "losses": losses}


def main() -> None:
    out = {f"{a}/{m}/{int(c)}": fingerprint(a, m, c) for a, m, c in CASES}
    json.dump({"torch": torch.__version__, "cases": out}, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
