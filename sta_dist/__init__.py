"""sta_dist: distributed, sequence-parallel sliding tile attention for video DiTs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sta-dist")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

from .api import local_attention, route_of, sliding_tile_attention, to_natural, to_tiled
from .backend import (
    RangeDict,
    SlidingTileAttentionBackend,
    SlidingTileAttentionImpl,
    SlidingTileAttentionMetadata,
    SlidingTileAttentionMetadataBuilder,
    logger,
)
from .config import STAConfig
from .distributed import DistributedSlidingTileAttention
from .mask_strategy import MaskStrategy
from .parallel.env import DistEnv, init_distributed
from .parallel.plan import ShardPlan
from .selection import Mass, TopK

__all__ = [
    "__version__",
    "sliding_tile_attention",
    "to_tiled",
    "to_natural",
    "local_attention",
    "route_of",
    "TopK",
    "Mass",
    "STAConfig",
    "MaskStrategy",
    "ShardPlan",
    "DistributedSlidingTileAttention",
    "init_distributed",
    "DistEnv",
    "RangeDict",
    "SlidingTileAttentionBackend",
    "SlidingTileAttentionImpl",
    "SlidingTileAttentionMetadata",
    "SlidingTileAttentionMetadataBuilder",
    "logger",
]
