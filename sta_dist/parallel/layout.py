"""The mesh layout: which tokens each rank holds, on a (head axis x tile axis) mesh. Pure data
and geometry; no decision (which mesh, which split: :mod:`~sta_dist.parallel.decide`).

Every mode is the same machine on a mesh ``(P_head, P_tile)``:

- the tile axis splits the tile grid into ``P_tile`` boxes (``tile_split``); ranks of one
  tile group (same head index) exchange only halo tiles;
- the head axis splits each box's tiles into ``P_head`` contiguous chunks; ranks of one
  head group (same box) trade tokens for heads with an all-to-all.

Rank ``r`` sits at ``(r // P_tile, r % P_tile)``. A rank holds its chunk's video tokens
(packed order of its tiles) and then all ``L`` text tokens (text is replicated).
``order="natural"`` instead holds contiguous chunks of the natural order (FastVideo's
sharding); that works on a mesh without a tile axis.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import geometry
from ..config import STAConfig, check_triple
from ..geometry import Box, Triple

ORDERS = ("tiled", "natural")


def check_mesh(mesh, world_size: int, given=None) -> tuple[int, int]:
    """``mesh`` as ``(P_head, P_tile)`` ints multiplying to ``world_size`` (``given``: what
    the caller passed, for the message)."""
    try:
        mesh = tuple(int(m) for m in mesh)
    except (TypeError, ValueError):
        mesh = ()
    if len(mesh) != 2 or mesh[0] < 1 or mesh[1] < 1 or mesh[0] * mesh[1] != world_size:
        raise ValueError(f"mesh must be (P_head, P_tile) with P_head * P_tile = world_size = {world_size}, "
                         f"got mesh={given!r}")
    return mesh  # type: ignore[return-value]


def check_head_chunks(head_chunks) -> None:
    if type(head_chunks) is not int or head_chunks < 1:
        raise ValueError(f"head_chunks must be an int >= 1, got head_chunks={head_chunks!r}")


def check_tile_split(split, tile_ranks: int, grid: Triple) -> Triple:
    """``split`` as a triple of boxes per axis multiplying to ``tile_ranks``, within ``grid``."""
    split = check_triple("tile_split", split)
    if geometry.volume(split) != tile_ranks or any(p > n for p, n in zip(split, grid)):
        raise ValueError(
            f"tile_split must multiply to the {tile_ranks} tile ranks and not exceed the grid {grid} "
            f"on any axis, got tile_split={split}"
        )
    return split


@dataclass(frozen=True, kw_only=True)
class MeshLayout:
    """Which tokens each rank holds, and the mesh they are exchanged on.

    ``MeshLayout(canvas=(T, H, W), tile=(tt, th, tw), text_len=L, world_size=P,
    mesh=(P_head, P_tile), tile_split=(pt, ph, pw))``: everything given, nothing chosen
    (:class:`~sta_dist.parallel.plan.ShardPlan` chooses what is left out).
    """

    canvas: Triple
    tile: Triple
    text_len: int
    world_size: int
    mesh: tuple[int, int]
    """``(P_head, P_tile)``, multiplying to ``world_size``."""
    tile_split: Triple
    """Boxes per grid axis, multiplying to ``P_tile``."""
    order: str = "tiled"
    head_chunks: int = 1
    """In how many chunks of heads a call in head mode exchanges and attends, each chunk's
    all-to-all running beside the attention of the chunks before it (at most as many as a
    rank has kv heads). ``1`` (the default): one exchange, then the attention. On 2 H100s 3
    chunks took a uniform (3,3,3) layer from 16.8 to 14.7 ms, but the real strategy's mixed
    layers from 1.82 to 1.92 s a step: see docs/perf.md."""

    def __post_init__(self) -> None:
        self._check_config()
        self._check_fields()
        check_head_chunks(self.head_chunks)
        set_ = functools.partial(object.__setattr__, self)
        set_("mesh", check_mesh(self.mesh, self.world_size, self.mesh))
        if self.order == "natural" and self.mesh[1] != 1:
            raise ValueError(f"order='natural' (FastVideo's contiguous chunks) needs a mesh without a tile axis "
                             f"(tile-aligned shards need order='tiled'), got mesh={self.mesh}")
        set_("tile_split", check_tile_split(self.tile_split, self.mesh[1], self.grid))

    def _check_config(self) -> None:
        """Canvas, tile and text length, as :class:`STAConfig` checks and normalises them."""
        cfg = STAConfig(canvas=self.canvas, tile=self.tile, text_len=self.text_len)
        object.__setattr__(self, "canvas", cfg.canvas)
        object.__setattr__(self, "tile", cfg.tile)
        object.__setattr__(self, "text_len", cfg.text_len)

    def _check_fields(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got order={self.order!r}")
        if int(self.world_size) != self.world_size or self.world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got world_size={self.world_size!r}")

    # -- geometry of the mesh ----------------------------------------------------------
    @property
    def config(self) -> STAConfig:
        return STAConfig(canvas=self.canvas, tile=self.tile, text_len=self.text_len)

    @property
    def grid(self) -> Triple:
        return geometry.grid_shape(self.canvas, self.tile)

    def mesh_coords(self, rank: int) -> tuple[int, int]:
        """``(head index, tile index)`` of a rank."""
        self._check_rank(rank)
        return rank // self.mesh[1], rank % self.mesh[1]

    def head_group(self, rank: int) -> tuple[int, ...]:
        """Ranks sharing ``rank``'s box (its head all-to-all group), by head index."""
        t = self.mesh_coords(rank)[1]
        return tuple(h * self.mesh[1] + t for h in range(self.mesh[0]))

    def tile_group(self, rank: int) -> tuple[int, ...]:
        """Ranks sharing ``rank``'s heads (its halo exchange group), by tile index."""
        h = self.mesh_coords(rank)[0]
        return tuple(h * self.mesh[1] + t for t in range(self.mesh[1]))

    @functools.cached_property
    def boxes(self) -> tuple[Box, ...]:
        return tuple(geometry.rank_boxes(self.grid, self.tile_split))

    def box(self, rank: int) -> Box:
        return self.boxes[self.mesh_coords(rank)[1]]

    @functools.cached_property
    def _held_tiles(self) -> tuple[tuple[int, ...], ...]:
        out = []
        for rank in range(self.world_size):
            h, _ = self.mesh_coords(rank)
            tiles = self.box(rank).tile_ids(self.grid)
            lo, hi = geometry.split_range(len(tiles), self.mesh[0])[h]
            out.append(tuple(tiles[lo:hi]))
        return tuple(out)

    def held_tiles(self, rank: int) -> tuple[int, ...]:
        """Tile ids ``rank`` holds, in its storage order (tiled order only)."""
        self._check_rank(rank)
        if self.order == "natural":
            raise ValueError("order='natural' shards hold token ranges, not whole tiles")
        return self._held_tiles[rank]

    def box_tiles(self, head_group: tuple[int, ...]) -> tuple[int, ...]:
        """The tiles of a head group's box, in its storage order (its members' in turn)."""
        return tuple(t for r in head_group for t in self.held_tiles(r))

    @functools.cached_property
    def _natural_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(geometry.split_range(self.config.num_video, self.world_size))

    def held_count(self, rank: int) -> int:
        """Video tokens ``rank`` holds."""
        self._check_rank(rank)
        if self.order == "natural":
            lo, hi = self._natural_ranges[rank]
            return hi - lo
        return geometry.packed_token_count(self.canvas, self.tile, self._held_tiles[rank])

    def held_index(self, rank: int) -> torch.Tensor:
        """Natural-order index of each video token ``rank`` holds, in storage order."""
        self._check_rank(rank)
        if self.order == "natural":
            return torch.arange(*self._natural_ranges[rank])
        return geometry.packed_natural_index(self.canvas, self.tile, self._held_tiles[rank])

    def positions(self, rank: int) -> torch.Tensor:
        """``(t, h, w)`` of each video token ``rank`` holds, ``[n, 3]`` long (for RoPE)."""
        idx = self.held_index(rank)
        c = self.canvas
        return torch.stack([idx // (c[1] * c[2]), (idx // c[2]) % c[1], idx % c[2]], 1)

    # -- shard / unshard -----------------------------------------------------------------
    def shard(self, x_full: torch.Tensor, rank: int) -> torch.Tensor:
        """``x_full [B, S, ...]`` (natural order) -> what ``rank`` holds: its video tokens,
        then every text token."""
        self._check_seq(x_full, "x_full")
        idx = self.held_index(rank).to(x_full.device)
        return torch.cat([x_full[:, idx], x_full[:, self.config.num_video:]], 1)

    def unshard(self, x_locals: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`shard` over all ranks (text taken from rank 0)."""
        if len(x_locals) != self.world_size:
            raise ValueError(f"unshard needs one tensor per rank ({self.world_size}), got {len(x_locals)}")
        n_video = self.config.num_video
        first = x_locals[0]
        out = first.new_empty((first.shape[0], self.config.seq_len, *first.shape[2:]))
        for rank, x in enumerate(x_locals):
            n = self.held_count(rank)
            if x.shape[1] != n + self.text_len:
                raise ValueError(
                    f"rank {rank}'s tensor must hold {n} video + {self.text_len} text tokens, got x.shape={tuple(x.shape)}"
                )
            out[:, self.held_index(rank).to(x.device)] = x[:, :n]
        out[:, n_video:] = first[:, first.shape[1] - self.text_len:]
        return out

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got rank={rank}")

    def _check_seq(self, x: torch.Tensor, name: str) -> None:
        if x.dim() < 2 or x.shape[1] != self.config.seq_len:
            raise ValueError(
                f"{name} must be [B, S, ...] with S = T*H*W + L = {self.config.seq_len}, got {name}.shape={tuple(x.shape)}"
            )


@functools.lru_cache(maxsize=256)
def whole_canvas_halo(layout: MeshLayout, windows: tuple[Triple, ...]) -> bool:
    """Would some box's windows reach every tile of the grid (so its halo is the rest of
    the canvas)? Then tile parallelism only moves more bytes than head parallelism."""
    if layout.mesh[1] == 1:
        return False
    n = geometry.num_tiles(layout.grid)
    return any(len(geometry.key_tiles(box, windows, layout.grid)) == n for box in layout.boxes)
