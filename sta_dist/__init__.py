"""sta_dist: distributed, sequence-parallel sliding tile attention for video DiTs."""

from .api import local_attention, sliding_tile_attention, to_natural, to_tiled
from .backend import (
    RangeDict,
    SlidingTileAttentionBackend,
    SlidingTileAttentionImpl,
    SlidingTileAttentionMetadata,
    SlidingTileAttentionMetadataBuilder,
    logger,
)
from .config import STAConfig
from .mask_strategy import MaskStrategy

__all__ = [
    "sliding_tile_attention",
    "to_tiled",
    "to_natural",
    "local_attention",
    "STAConfig",
    "MaskStrategy",
    "RangeDict",
    "SlidingTileAttentionBackend",
    "SlidingTileAttentionImpl",
    "SlidingTileAttentionMetadata",
    "SlidingTileAttentionMetadataBuilder",
    "logger",
]
