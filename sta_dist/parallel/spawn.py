"""Run a function on several local processes with a real process group (gloo on CPU):
what ``sta-dist run`` does without torchrun, and what the distributed tests use.

Every spawn gets a free port and a deadline; a rank that fails or a job past its deadline
ends all ranks and raises with each failing rank's error, so nothing can hang.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.multiprocessing as mp


class SpawnError(RuntimeError):
    """One or more ranks failed or the job ran past its deadline. ``str()`` gives one line
    per failed rank (its error); ``details`` the ranks' tracebacks."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, timeout_s: float, fn: Callable,
            args: Sequence[Any], results: "mp.Queue", env: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), **env})
    try:
        from .env import init_distributed

        if backend == "fake":
            import torch.distributed as dist
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=int(env["FAKE_RANK"]),
                                    world_size=int(env["FAKE_WORLD_SIZE"]))
        else:
            init_distributed(backend=backend, timeout_s=timeout_s)
        # Serialised to bytes: tensors in shared memory would die with this process.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, "error", (f"{type(err).__name__}: {err}", traceback.format_exc())))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the group may be broken by a dead peer
                pass


def spawn_local(fn: Callable, world_size: int, args: Sequence[Any] = (), *, timeout_s: float = 120.0,
                backend: str = "gloo", collective_timeout_s: Optional[float] = None,
                env: Optional[dict] = None, allow_failures: bool = False) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return each rank's
    result (rank order). ``fn`` must be importable (module level). With
    ``allow_failures`` a failed rank's entry is its error text instead of raising."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, collective_timeout_s or timeout_s,
                                          fn, tuple(args), results, dict(env or {})), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    got: dict[int, tuple[str, Any]] = {}
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SpawnError(f"ranks {sorted(set(range(world_size)) - set(got))} did not finish within {timeout_s}s")
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
                got[rank] = (status, value)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in got]
                for r in dead:
                    got[r] = ("error", (f"process exited with code {procs[r].exitcode} before reporting", ""))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    failures = {r: v for r, (s, v) in got.items() if s != "ok"}
    if failures and not allow_failures:
        raise SpawnError("\n".join(f"rank {r} failed: {summary}" for r, (summary, _) in sorted(failures.items())),
                         "\n".join(f"rank {r}: {trace}" for r, (_, trace) in sorted(failures.items())))
    return [torch.load(io.BytesIO(v), weights_only=False) if s == "ok" else f"{v[0]}\n{v[1]}"
            for s, v in (got[r] for r in range(world_size))]
