"""Process groups from the launcher's environment: torchrun, SLURM (srun), or nothing.

One helper, :func:`init_distributed`: NCCL on GPUs, gloo on CPU, an explicit collective
timeout so a dead or hung peer ends the job instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True, kw_only=True, slots=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    local_rank: int
    """Rank on this node (picks the GPU)."""
    source: str
    """"torchrun", "slurm" or "single"."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read rank and world size: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` first,
    else SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (one task per GPU;
    the batch script exports ``MASTER_ADDR``/``MASTER_PORT``), else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                       local_rank=int(env.get("LOCAL_RANK", 0)), source="torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistEnv(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                       local_rank=int(env.get("SLURM_LOCALID", 0)), source="slurm")
    return DistEnv(rank=0, world_size=1, local_rank=0, source="single")


def init_distributed(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Initialise the default process group from the environment (no-op for a process no
    launcher started, or when already initialised). Backend: NCCL when CUDA is available,
    else gloo."""
    env = detect_env(environ)
    if env.source == "single" or dist.is_initialized():
        return env
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    source = os.environ if environ is None else environ
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in source:
            raise RuntimeError(f"{name} must be set for a {env.source} launch of {env.world_size} ranks")
    dist.init_process_group(
        backend=backend or ("nccl" if use_cuda else "gloo"),
        init_method=f"tcp://{source['MASTER_ADDR']}:{source['MASTER_PORT']}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return env
