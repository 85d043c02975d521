"""Process groups from the launcher's environment: torchrun, SLURM (srun), or nothing.

One helper, :func:`init_distributed`: NCCL on GPUs, gloo on CPU, a bounded rendezvous (a
wrong environment fails in seconds with what to fix) and an explicit collective timeout, so a
dead or hung peer ends the job instead of hanging it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0
RENDEZVOUS_TIMEOUT_S = 15.0
"""How long ranks wait for each other to form the job: past it, a missing rank or an
unreachable master is an error, not a hang."""


class LaunchError(RuntimeError):
    """The launcher's environment cannot form a job (says what to fix)."""


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name} must be an int, got {name}={env[name]!r}") from None


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
        names, source = ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _env_int(env, "SLURM_NTASKS") > 1:
        names, source = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), "slurm"
    else:
        return DistEnv(rank=0, world_size=1, local_rank=0, source="single")
    rank, world_size = _env_int(env, names[0]), _env_int(env, names[1])
    local_rank = _env_int(env, names[2]) if names[2] in env else 0
    if world_size < 1:
        raise LaunchError(f"{names[1]} must be >= 1, got {names[1]}={world_size}")
    if not 0 <= rank < world_size:
        raise LaunchError(f"{names[0]} must be in [0, {names[1]}={world_size}), got {names[0]}={rank}: "
                          f"each of the {world_size} ranks needs its own {names[0]} below {names[1]}")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, source=source)


def init_distributed(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     environ: Optional[Mapping[str, str]] = None,
                     rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S) -> DistEnv:
    """Initialise the default process group from the environment (no-op for a process no
    launcher started, or when already initialised). Backend: NCCL when CUDA is available,
    else gloo. Ranks that do not all meet within ``rendezvous_timeout_s`` raise a
    :class:`LaunchError` that says what to fix; collectives time out after ``timeout_s``."""
    env = detect_env(environ)
    if env.source == "single" or dist.is_initialized():
        return env
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    source = os.environ if environ is None else environ
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in source:
            raise LaunchError(f"{name} must be set for a {env.source} launch of {env.world_size} ranks "
                              f"(torchrun sets it; under SLURM the batch script exports it)")
    address = f"{source['MASTER_ADDR']}:{source['MASTER_PORT']}"
    url = "env://" if environ is None else f"tcp://{address}"
    deadline = time.monotonic() + rendezvous_timeout_s
    try:
        with _quiet_stderr() as noise:
            if env.rank != 0 or _agent_store(source):  # a client: is anyone listening?
                _wait_for_listener(source["MASTER_ADDR"], int(source["MASTER_PORT"]), deadline)
            store, _, _ = next(dist.rendezvous(url, rank=env.rank, world_size=env.world_size,
                                               timeout=datetime.timedelta(seconds=max(deadline - time.monotonic(), 1))))
            held_back = noise.getvalue()
        sys.stderr.write(held_back)
    except Exception as err:  # noqa: BLE001 - every rendezvous failure becomes one clear error
        if env.rank == 0 and not _agent_store(source):
            fix = (f"only some of the {env.world_size} ranks joined: start WORLD_SIZE={env.world_size} processes "
                   f"(the launcher's process count must match it) or lower WORLD_SIZE")
        else:
            fix = f"rank 0 did not answer at {address}: check MASTER_ADDR/MASTER_PORT and that rank 0 is running"
        raise LaunchError(f"rank {env.rank} of {env.world_size} could not form the job at {address} within "
                          f"{rendezvous_timeout_s:g} s: {fix} ({type(err).__name__})") from err
    dist.init_process_group(
        backend=backend or ("nccl" if use_cuda else "gloo"),
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return env


def _agent_store(environ: Mapping[str, str]) -> bool:
    """torchrun's agent hosts the store; every worker, rank 0 too, is a client of it."""
    return environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _wait_for_listener(host: str, port: int, deadline: float) -> None:
    """Connect attempts until something listens at ``host:port`` or the deadline passes
    (PyTorch's store client retries past its own timeout, doubling the wait)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nothing listens at {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=min(left, 1.0)):
                return
        except OSError:
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))


class _Captured:
    def __init__(self, file):
        self.file = file

    def getvalue(self) -> str:
        self.file.seek(0)
        return self.file.read().decode(errors="replace")


@contextlib.contextmanager
def _quiet_stderr():
    """Hold back what C++ writes to fd 2 (the store's retry logs and stack frames) so a
    failed rendezvous reaches the user as one clear error; the caller replays it on
    success."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield _Captured(tmp)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
