"""TorchX components of ctnocvr-rec: ``train`` (torchrun over N nodes x M ranks) and ``evaluate``.

Both are thin wrappers over ``torchx.components.dist.ddp``, so the same component runs on every
TorchX scheduler::

    # 2 CPU ranks on this machine (defaults from .torchxconfig)
    torchx run -s local_cwd launchers/ctnocvr.py:train --config mmoe_ctnocvr -- -o train.steps=200
    # 2 nodes x 8 GPUs on Slurm / Kubernetes (see docs/train.md)
    torchx run -s slurm launchers/ctnocvr.py:train --j 2x8 --gpu 8 --config aliccp_paper_mmoe

Everything after ``--`` is passed to ``ctnocvr train`` (``-o key=value`` overrides, ``--run-dir``).
``torchx run`` refuses an option given twice after ``--`` ("Repeated Command Line Arguments"), so
give all overrides after ONE ``-o``: ``-- -o train.steps=200 model.num_experts=4 --run-dir runs/x``.
TorchX does not expose torchrun's ``--max-restarts``; ``max_restarts`` here adds it, so a rank that
dies makes torchrun restart the whole job, which then resumes from the newest checkpoint.
"""

# TorchX reads component signatures itself and only understands typing.Optional / Dict / List.
# ruff: noqa: UP006, UP007, UP035, UP045
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

MODULE = "ctnocvr_rec.cli"
DEFAULT_IMAGE = "ghcr.io/pytorch/torchx:0.7.0"


def _with_torchrun_flags(app: specs.AppDef, flags: List[str]) -> specs.AppDef:
    """Insert extra torchrun flags into the ``bash -c "torchrun ..."`` command of a ddp AppDef."""
    if not flags:
        return app
    for role in app.roles:
        cmd = role.args[-1]
        if not cmd.startswith("torchrun "):
            raise ValueError(f"unexpected dist.ddp command {cmd!r}")
        role.args[-1] = "torchrun " + " ".join(flags) + cmd[len("torchrun"):]
    return app


def train(
    *train_args: str,
    config: str = "mmoe_ctnocvr",
    j: str = "1x2",
    resume: bool = False,
    plan: str = "",
    max_restarts: int = 0,
    threads_per_rank: int = 1,
    image: str = DEFAULT_IMAGE,
    name: str = "ctnocvr-train",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,  # noqa: N803 (TorchX's resource argument name)
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Distributed ``ctnocvr train``.

    Args:
        train_args: extra arguments of ``ctnocvr train`` (e.g. ``-o train.steps=200 train.seed=3 --run-dir runs/x``;
            several overrides follow one ``-o``: torchx rejects a repeated ``-o``)
        config: run config: a packaged name (``mmoe_ctnocvr``, ``aliccp_paper_mmoe``, ...) or a YAML path
            inside the job's working directory / image
        j: ``{nnodes}x{nproc_per_node}`` (e.g. 1x2 on a CPU box, 4x8 on GPU nodes)
        resume: continue from the newest checkpoint of the run folder
        plan: enforce a saved sharding plan JSON (``ctnocvr plan --save``)
        max_restarts: torchrun restarts of the whole job after a rank fails (each resumes from the
            newest checkpoint)
        threads_per_rank: OMP_NUM_THREADS of each rank (CPU runs; GPU runs need few anyway)
        image: container image (docker/kubernetes) or ignored (local_cwd, slurm)
        name: job name
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a named resource of the scheduler (overrides cpu/gpu/memMB)
        env: extra environment variables
        max_retries: scheduler-level retries of the whole job
        rdzv_port: c10d rendezvous port (multi-node)
        mounts: volume mounts (docker/kubernetes), TorchX's mount syntax
    """
    args = ["train", "-c", config, *train_args]
    if resume:
        args.append("--resume")
    if plan:
        args += ["--plan", plan]
    job_env = {"OMP_NUM_THREADS": str(threads_per_rank), **(env or {})}
    app = dist.ddp(
        *args, m=MODULE, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j,
        env=job_env, max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts,
    )
    return _with_torchrun_flags(app, [f"--max-restarts={max_restarts}"] if max_restarts > 0 else [])


def evaluate(
    run_dir: str,
    split: str = "test",
    checkpoint: str = "",
    predictions: bool = False,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,  # noqa: N803
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """``ctnocvr eval`` of a run's checkpoint in one process (unsharded; any saved world size).

    Args:
        run_dir: run folder written by ``ctnocvr train``
        split: split of the prepared set to evaluate
        checkpoint: checkpoint folder (default: the newest of the run)
        predictions: also write predictions/<split>.parquet
        image: container image
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        h: a named resource of the scheduler
        env: extra environment variables
        mounts: volume mounts
    """
    args = ["eval", "--run-dir", run_dir, "--split", split]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    if predictions:
        args.append("--predictions")
    return dist.ddp(
        *args, m=MODULE, image=image, name="ctnocvr-eval", h=h, cpu=cpu, gpu=gpu, memMB=memMB, j="1x1",
        env=dict(env or {}), mounts=mounts,
    )
