"""Running FastVideo 0.1.7's own layers on a CPU, for the tests that drive them.

- torchvision: FastVideo's ``fastvideo.utils`` imports ``torchvision.utils`` at the top, but
  none of the layers, parallel state, forward context or denoising stage these tests drive
  uses it; PyPI's torchvision is a CUDA build that does not load beside the CPU torch. So
  where ``import torchvision`` fails, a guard module stands in that raises on any use
  (a test that reached torchvision would fail, not pass silently).
- backend selection: FastVideo's CPU platform selects no attention backend; the tests put
  the choice FastVideo's CUDA platform makes (its module path for SLIDING_TILE_ATTN and
  TORCH_SDPA) in its place.
- distributed state: FastVideo's own world and sequence-parallel groups, built on the
  gloo group that ``sta_dist.parallel.spawn.spawn_local`` made.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types

import pytest

TORCHVISION_MODULES = ("torchvision", "torchvision.utils", "torchvision.transforms",
                       "torchvision.transforms.functional", "torchvision.io")


class _Unused(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__name__}.{name} was used: the torchvision guard of tests/fastvideo_support.py "
                           "stands in for a torchvision that cannot load here")


def guard_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - PyPI's CUDA build raises RuntimeError beside a CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    # transformers and diffusers decide once, on import, whether torchvision is there: they
    # must see that it is not (transformers 5 would import torchvision.io from the guard).
    import importlib

    for probe in ("transformers", "diffusers"):
        try:
            importlib.import_module(probe)
        except ImportError:
            pass
    for name in TORCHVISION_MODULES:
        module = _Unused(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


MISSING = ("fastvideo is not installed: pip install -e '.[fastvideo-test]' && pip install --no-deps "
           "fastvideo==0.1.7 (as the README says)")
"""The skip message where FastVideo is missing: the extra that exists, then FastVideo itself."""


def skip_without_fastvideo() -> None:
    """Skip the test where FastVideo is not installed, saying how to install it."""
    import importlib.util

    if importlib.util.find_spec("fastvideo") is None:
        pytest.skip(MISSING)


def import_fastvideo():
    """FastVideo, or skip the test where it is not installed."""
    skip_without_fastvideo()
    guard_torchvision()
    os.environ.setdefault("FASTVIDEO_LOGGING_LEVEL", "WARNING")
    import fastvideo

    return fastvideo


def select_like_cuda(backend_name: str) -> None:
    """What FastVideo's CUDA platform returns for the selected backend, on this CPU."""
    from fastvideo.attention import selector
    from fastvideo.platforms import AttentionBackendEnum, current_platform

    paths = {
        AttentionBackendEnum.SLIDING_TILE_ATTN: "fastvideo.attention.backends.sliding_tile_attn.SlidingTileAttentionBackend",
        AttentionBackendEnum.TORCH_SDPA: "fastvideo.attention.backends.sdpa.SDPABackend",
    }
    type(current_platform).get_attn_backend_cls = classmethod(lambda cls, selected, head_size, dtype: paths[selected])
    os.environ["FASTVIDEO_ATTENTION_BACKEND"] = backend_name
    selector._cached_get_attn_backend.cache_clear()


def init_sequence_parallel(rank: int, world_size: int) -> None:
    """FastVideo's world, tensor- and sequence-parallel groups (SP = the whole world) on
    the process group that already exists (or a one-process one)."""
    import torch.distributed as dist
    from fastvideo.distributed import parallel_state as ps

    if not dist.is_initialized():
        from sta_dist.parallel.spawn import free_port

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if ps._WORLD is None:
        ps.init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank)
    if ps._SP is None:
        ps.initialize_model_parallel(tensor_model_parallel_size=1, sequence_model_parallel_size=world_size)
