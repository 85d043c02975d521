"""sta_dist's seed classes as FastVideo 0.1.7's ``fastvideo.attention.backends.sliding_tile_attn``.

The import hook serves this module under FastVideo's name, so FastVideo's selector and its
denoising stage's identity check both get these classes. They add to the seed classes only
what lives in FastVideo: its mask-strategy setting, its sequence-parallel group, its
ForwardBatch for mask-search losses, its logger, and (in tile mode) the per-call plan.
"""

from __future__ import annotations

import functools
import json
import os

import torch.distributed as dist

from fastvideo import envs
from fastvideo.attention.backends.abstract import AttentionBackend
from fastvideo.distributed import get_sp_group
from fastvideo.forward_context import get_forward_context
from fastvideo.logger import init_logger

from ... import backend as core
from . import parallel

logger = init_logger("fastvideo.attention.backends.sliding_tile_attn")
RangeDict = core.RangeDict
SlidingTileAttentionMetadata = core.SlidingTileAttentionMetadata


@functools.lru_cache(maxsize=8)
def _check_strategy_file(path: str, mtime: float) -> None:
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"FASTVIDEO_ATTENTION_CONFIG must name a readable mask-strategy JSON "
                         f"('t_l_h': [kt, kh, kw]), got FASTVIDEO_ATTENTION_CONFIG={path!r} ({err})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"FASTVIDEO_ATTENTION_CONFIG must hold a JSON object 't_l_h' -> [kt, kh, kw], "
                         f"got a {type(entries).__name__} in {path!r}")


def check_attention_config() -> str:
    """FastVideo's Impl needs ``FASTVIDEO_ATTENTION_CONFIG`` to name a mask-strategy file
    when it is built; so does this one (checked once per file)."""
    path = envs.FASTVIDEO_ATTENTION_CONFIG
    if path is None:
        raise ValueError("FASTVIDEO_ATTENTION_CONFIG is not set: it must name the mask-strategy JSON "
                         "('t_l_h': [kt, kh, kw]) for FASTVIDEO_ATTENTION_BACKEND=SLIDING_TILE_ATTN")
    if not os.path.isfile(path):
        raise ValueError(f"FASTVIDEO_ATTENTION_CONFIG must name an existing mask-strategy file, "
                         f"got FASTVIDEO_ATTENTION_CONFIG={path!r} (no such file)")
    _check_strategy_file(path, os.path.getmtime(path))
    return path


class SlidingTileAttentionMetadataBuilder(core.SlidingTileAttentionMetadataBuilder):
    def __init__(self) -> None:
        # the STA tile of FastVideo's calls: install(tile=) or STA_DIST_FASTVIDEO_TILE
        super().__init__(tile=parallel.settings().tile)


class SlidingTileAttentionImpl(core.SlidingTileAttentionImpl):
    def __init__(self, num_heads, head_size, causal, softmax_scale, num_kv_heads=None, prefix="",
                 **extra_impl_args) -> None:
        check_attention_config()
        super().__init__(num_heads, head_size, causal, softmax_scale, num_kv_heads, prefix, **extra_impl_args)

    def sequence_parallel(self) -> tuple[int, int]:
        group = get_sp_group()
        return group.rank_in_group, group.world_size

    def record_search(self, attn_metadata, losses: dict) -> None:
        """Into FastVideo's ForwardBatch, as its Impl does, but with every head: under
        sequence parallelism the ranks' head losses are gathered in head order."""
        group = get_sp_group()
        if group.world_size > 1:
            everyone: list = [None] * group.world_size
            dist.all_gather_object(everyone, losses, group=group.cpu_group)
            losses = {name: [sum((r[name][c] for r in everyone), []) for c in range(len(losses[name]))]
                      for name in losses}
        batch = get_forward_context().forward_batch
        if batch is None:
            return super().record_search(attn_metadata, losses)
        results = batch.mask_search_final_result_neg if batch.is_cfg_negative else batch.mask_search_final_result_pos
        if results is not None:
            results[attn_metadata.current_timestep].append(losses)


class SlidingTileAttentionBackend(core.SlidingTileAttentionBackend, AttentionBackend):
    # The core's classmethods come first in the MRO and serve FastVideo's abstract getters.
    classes = (SlidingTileAttentionImpl, SlidingTileAttentionMetadata, SlidingTileAttentionMetadataBuilder)
