"""The evaluation keeps copies, not views, of what it collects from each batch.

Batches built in DataLoader workers reach the rank in shared memory, one file descriptor per tensor
storage (torch's default ``file_descriptor`` strategy). A numpy view of ``batch.sample_id`` kept for
the whole split held one descriptor per column and batch: at Ali-CCP's full shape (~1,300 evaluation
batches per rank, 6 kept batch columns) that passes a 1,024-descriptor limit and the loader dies with
``RuntimeError: received 0 items of ancdata``. Checked here under a 256-descriptor limit with 300
batches: the old code (views) fails this test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from ctnocvr_rec.train.testing import write_tiny_prepared

CHILD = textwrap.dedent("""
    import resource, sys, torch
    from ctnocvr_rec.data.dataset import make_dataloader
    from ctnocvr_rec.train.distributed import DistContext
    from ctnocvr_rec.train.evaluate import predict

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    class Scores(torch.nn.Module):
        # stands in for a ranker: one output per task, from the batch
        def forward(self, batch):
            p = torch.sigmoid(batch.sparse_features.values()[: batch.batch_size].float() / 40)
            p = torch.nn.functional.pad(p, (0, batch.batch_size - p.numel()))
            return None, {"p_ctr": p, "p_cvr": p, "p_ctcvr": p * p, "p_ctnocvr": p - p * p}

    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"), "gloo", None, False)
    loader = make_dataloader(sys.argv[1], "test", 4, num_workers=1)
    columns = predict(ctx, Scores(), loader, [], torch.device("cpu"))
    assert len(columns["sample_id"]) == 1200, len(columns["sample_id"])
    print("rows", len(columns["sample_id"]))
""")


def test_predict_over_many_worker_batches_under_a_low_descriptor_limit(tmp_path: Path) -> None:
    root = write_tiny_prepared(tmp_path / "prepared", {"train": 40, "test": 1200}, rows_per_file=600)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rows 1200" in proc.stdout
