"""sta_dist as FastVideo 0.1.7's ``SLIDING_TILE_ATTN`` backend.

Two lines for a FastVideo user::

    python -m sta_dist.integrations.fastvideo install      # once: a .pth hook in site-packages
    FASTVIDEO_ATTENTION_BACKEND=SLIDING_TILE_ATTN FASTVIDEO_ATTENTION_CONFIG=mask.json python ...

or, in code, ``sta_dist.integrations.fastvideo.install()`` before FastVideo builds its
pipeline. Options: ``install(parallel="tile")`` (or ``STA_DIST_FASTVIDEO_PARALLEL=tile``,
also ``auto``/``hybrid``) replaces FastVideo's head all-to-all by sta_dist's tile mode in
its sequence-parallel group; ``tile=`` (``STA_DIST_FASTVIDEO_TILE=6,8,8``) the STA tile;
``search_candidates=`` the windows its mask search tries.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .. import hook

__all__ = ["install", "uninstall"]


def install(parallel: Optional[str] = None, tile=None, search_candidates: Optional[Sequence] = None) -> None:
    """Serve sta_dist's backend under FastVideo's module name in this process; patch the
    FastVideo modules already imported (else they are patched as they load)."""
    from . import parallel as _parallel
    from . import search as _search

    _parallel.configure(parallel, tile)
    if search_candidates is not None:
        _search.set_candidates(search_candidates)
    hook.activate()
    name = "fastvideo.attention.backends.sliding_tile_attn"
    if name in sys.modules and not sys.modules[name].__name__.startswith("sta_dist."):
        del sys.modules[name]  # FastVideo's own module was loaded first: serve ours from now on
    if "fastvideo.pipelines.stages.denoising" in sys.modules or "fastvideo.attention.selector" in sys.modules:
        _refresh_loaded()


def _refresh_loaded() -> None:
    """What FastVideo bound before the hook was active: the denoising stage's backend
    class (its identity check), the selector's cache, and the patched functions."""
    import importlib

    ours = importlib.import_module("fastvideo.attention.backends.sliding_tile_attn")
    stage = sys.modules.get("fastvideo.pipelines.stages.denoising")
    if stage is not None:
        stage.SlidingTileAttentionBackend = ours.SlidingTileAttentionBackend
        stage.st_attn_available = True
        from .search import patch_denoising_stage

        patch_denoising_stage(stage)
    selector = sys.modules.get("fastvideo.attention.selector")
    if selector is not None:
        selector._cached_get_attn_backend.cache_clear()
    from .parallel import patch_attention_layer, patch_communication_op

    comm_op = sys.modules.get("fastvideo.distributed.communication_op")
    if comm_op is not None:
        originals = {n: getattr(comm_op, n) for n in ("sequence_model_parallel_shard", "sequence_model_parallel_all_gather",
                                                       "sequence_model_parallel_all_gather_with_unpad")}
        patch_communication_op(comm_op)
        for module in list(sys.modules.values()):  # modules that bound the originals by name
            if getattr(module, "__name__", "").startswith("fastvideo.") and module is not comm_op:
                for n, fn in originals.items():
                    if getattr(module, n, None) is fn:
                        setattr(module, n, getattr(comm_op, n))
    layer = sys.modules.get("fastvideo.attention.layer")
    if layer is not None:
        patch_attention_layer(layer)


def uninstall() -> None:
    """Take the hook off ``sys.meta_path`` in this process (the .pth is removed by
    ``python -m sta_dist.integrations.fastvideo uninstall``)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_sta_dist_hook", False)]
