"""The shard plan: which tokens each rank holds, on a (head axis x tile axis) mesh.

Every mode is the same machine on a mesh ``(P_head, P_tile)``:

- the tile axis splits the tile grid into ``P_tile`` boxes; ranks of one tile group
  (same head index) exchange only halo tiles;
- the head axis splits each box's tiles into ``P_head`` contiguous chunks; ranks of one
  head group (same box) trade tokens for heads with an all-to-all.

``mode="head"`` is the mesh ``(P, 1)`` (box = whole grid), ``"tile"`` is ``(1, P)``,
``"hybrid"`` any ``(P_head, P_tile)``. Rank ``r`` sits at ``(r // P_tile, r % P_tile)``.
Everything here is pure and deterministic, so it is the same on every rank.

A rank holds its chunk's video tokens (packed order of its tiles) and then all ``L`` text
tokens (text is replicated). ``order="natural"`` instead holds contiguous chunks of the
natural order (FastVideo's sharding); that works in head mode.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import geometry
from ..config import STAConfig, check_triple
from ..geometry import Box, Triple

MODES = ("head", "tile", "hybrid", "auto")
ORDERS = ("tiled", "natural")


def best_tile_split(grid: Triple, parts: int, windows: Sequence[Triple] = ((3, 3, 3),)) -> Optional[Triple]:
    """The split of the grid into ``parts`` boxes that balances tiles best, then moves the
    fewest halo tiles for ``windows``; ``None`` if the grid has fewer tiles than parts
    along every split."""
    best, best_key = None, None
    for split in geometry.factorizations(parts):
        if any(p > n for p, n in zip(split, grid)):
            continue
        boxes = geometry.rank_boxes(grid, split)
        largest = max(b.num_tiles for b in boxes)
        halo = max(len(geometry.key_tiles(b, windows, grid)) - b.num_tiles for b in boxes)
        key = (largest, halo, split)
        if best_key is None or key < best_key:
            best, best_key = split, key
    return best


def assign_heads(costs: Sequence[float], parts: int, kv_of: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Query heads to ``parts`` ranks by cost: longest first onto the least-loaded rank
    (ties: a rank already holding the head's kv head, then fewer heads, then the lower
    rank). Contiguous blocks when they balance just as well (uniform windows), since a
    block of heads is a view, not a copy. Returns each rank's heads, sorted."""
    load = [0.0] * parts
    heads: list[list[int]] = [[] for _ in range(parts)]
    for h in sorted(range(len(costs)), key=lambda h: (-costs[h], h)):
        r = min(range(parts), key=lambda r: (load[r], kv_of[h] not in {kv_of[x] for x in heads[r]}, len(heads[r]), r))
        load[r] += costs[h]
        heads[r].append(h)
    blocks = [tuple(range(lo, hi)) for lo, hi in geometry.split_range(len(costs), parts)]
    if max(sum(costs[h] for h in b) for b in blocks) <= max(load):
        return tuple(blocks)
    return tuple(tuple(sorted(h)) for h in heads)


def _mesh_cost(grid: Triple, mesh: tuple[int, int], windows: Sequence[Triple],
               num_heads: Optional[int]) -> Optional[tuple[tuple[float, float], Triple]]:
    """``((work, traffic), split)`` of one rank of the busiest box on ``mesh``, or ``None``
    if the tile axis cannot split the grid. Work is in tile-heads (the box's tiles times the
    heads a rank computes: idle heads show up as a larger share elsewhere); traffic is in
    tile-heads moved: the head all-to-all sends 3/4 of q, k, v out and o back for the
    ``(P_head - 1) / P_head`` not kept, the halo exchange k and v of its halo tiles."""
    p_head, p_tile = mesh
    split = best_tile_split(grid, p_tile, windows)
    if split is None:
        return None
    boxes = geometry.rank_boxes(grid, split)
    box = max(b.num_tiles for b in boxes)
    halo = max(len(geometry.key_tiles(b, windows, grid)) - b.num_tiles for b in boxes) if p_tile > 1 else 0
    heads = num_heads or p_head  # unknown: assume enough heads to go round
    work = box * geometry.ceil_div(heads, p_head)
    traffic = 4 * (box / p_head) * heads * (p_head - 1) / p_head + 2 * halo * heads / p_head
    return (work, traffic), split


def choose_mesh(grid: Triple, world_size: int, windows: Sequence[Triple], num_heads: Optional[int] = None,
                two_d: bool = False) -> tuple[tuple[int, int], str]:
    """The ``(P_head, P_tile)`` mesh of ``world_size`` ranks that gives the busiest rank
    the least work, then moves the fewest bytes; with the reason, as data. ``two_d``:
    only meshes with both axes above one, where ``world_size`` has such a split."""
    best = None
    genuine = [p for p in range(2, world_size) if world_size % p == 0]
    for p_head in (genuine if two_d and genuine else range(1, world_size + 1)):
        if world_size % p_head:
            continue
        mesh = (p_head, world_size // p_head)
        cost = _mesh_cost(grid, mesh, windows, num_heads)
        if cost is not None and (best is None or cost[0] < best[1]):
            best = (mesh, cost[0])
    if best is None:  # (P, 1) always splits: a box is the whole grid
        raise AssertionError("head mode always has a mesh")
    (work, traffic) = best[1]
    return best[0], f"mesh {best[0]} by cost: {work:g} tile-heads of work and {traffic:.0f} moved per rank"


def expected_selected_halo(box: Box, windows: Sequence[Triple], grid: Triple, selected: float) -> float:
    """Tiles outside ``box``'s window halo that its queries are expected to fetch when each
    query tile selects ``selected`` tiles more, chosen with no regard to where they lie
    (a model: real selections favour nearby tiles, so this is an upper estimate)."""
    if not selected:
        return 0.0
    n = geometry.num_tiles(grid)
    outside = n - len(geometry.key_tiles(box, windows, grid))
    return outside * (1.0 - (1.0 - min(1.0, selected / n)) ** box.num_tiles)


@dataclass(frozen=True)
class ShardPlan:
    """Which tokens each rank holds, and the mesh they are exchanged on.

    ``ShardPlan(canvas=(T, H, W), tile=(tt, th, tw), text_len=L, mode=..., world_size=P)``;
    ``mesh=(P_head, P_tile)`` for hybrid (default: chosen by :func:`choose_mesh`);
    ``tile_split=(pt, ph, pw)`` to choose the boxes (default: the most balanced, then the
    smallest halo for ``windows``); ``windows`` and ``num_heads`` are hints of the calls to
    expect, used by ``mode="auto"``, the default mesh and the default split.
    """

    canvas: Triple
    tile: Triple
    text_len: int
    mode: str
    world_size: int
    mesh: Optional[tuple[int, int]] = None
    tile_split: Optional[Triple] = None
    windows: Optional[tuple[Triple, ...]] = None
    order: str = "tiled"
    num_heads: Optional[int] = None
    """How many query heads the calls will have (a hint): lets ``auto`` and ``hybrid``
    see ranks that head mode would leave without a head."""
    selected_tiles: Optional[float] = None
    """Key tiles each query tile will select beyond its window (a hint for ``auto``, e.g.
    ``k`` of ``TopK(k)``): the tiles a box's queries choose can lie anywhere, so tile mode
    fetches more than its window halo (:func:`expected_selected_halo`)."""
    head_chunks: int = 1
    """In how many chunks of heads a call in head mode exchanges and attends, each chunk's
    all-to-all running beside the attention of the chunks before it (at most as many as a
    rank has kv heads). ``1`` (the default): one exchange, then the attention. On 2 H100s 3
    chunks took a uniform (3,3,3) layer from 16.8 to 14.7 ms, but the real strategy's mixed
    layers from 1.82 to 1.92 s a step: see docs/perf.md."""
    reason: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        cfg = STAConfig(canvas=self.canvas, tile=self.tile, text_len=self.text_len)
        set_ = functools.partial(object.__setattr__, self)
        set_("canvas", cfg.canvas)
        set_("tile", cfg.tile)
        set_("text_len", cfg.text_len)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={self.mode!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got order={self.order!r}")
        if int(self.world_size) != self.world_size or self.world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got world_size={self.world_size!r}")
        if self.windows is not None:
            set_("windows", tuple(check_triple("windows", w) for w in self.windows))
        if self.selected_tiles is not None and not (isinstance(self.selected_tiles, (int, float))
                                                    and 0 <= self.selected_tiles < float("inf")):
            raise ValueError(f"selected_tiles must be a number >= 0 or None, got selected_tiles={self.selected_tiles!r}")
        if type(self.head_chunks) is not int or self.head_chunks < 1:
            raise ValueError(f"head_chunks must be an int >= 1, got head_chunks={self.head_chunks!r}")
        if self.num_heads is not None and (int(self.num_heads) != self.num_heads or self.num_heads < 1):
            raise ValueError(f"num_heads must be an int >= 1 or None, got num_heads={self.num_heads!r}")
        if self.mesh is not None and self.mode != "hybrid":
            raise ValueError(f"mesh=(P_head, P_tile) is for mode='hybrid' (head and tile modes have fixed meshes), "
                             f"got mesh={self.mesh!r} with mode={self.mode!r}")
        grid, P = cfg.grid, self.world_size
        windows = self.windows or ((3, 3, 3),)
        mode, mesh, reason = self.mode, self.mesh, self.reason
        if mode == "auto":
            mode, mesh, reason = self._choose_mode(grid, windows)
        if self.order == "natural" and mode != "head":
            raise ValueError(
                f"order='natural' (FastVideo's contiguous chunks) works in head mode only; tile and hybrid "
                f"modes need tile-aligned shards (order='tiled'), got mode={self.mode!r}"
            )
        if mode == "head":
            mesh = (P, 1)
        elif mode == "tile":
            mesh = (1, P)
        elif mesh is None:
            mesh, reason = choose_mesh(grid, P, windows, self.num_heads, two_d=True)
            reason = f"hybrid: {reason}"
        try:
            mesh = tuple(int(m) for m in mesh)  # type: ignore[assignment]
        except (TypeError, ValueError):
            mesh = ()  # type: ignore[assignment]
        if len(mesh) != 2 or mesh[0] < 1 or mesh[1] < 1 or mesh[0] * mesh[1] != P:
            raise ValueError(f"mesh must be (P_head, P_tile) with P_head * P_tile = world_size = {P}, got mesh={self.mesh!r}")
        split = self.tile_split
        if split is None:
            split = best_tile_split(grid, mesh[1], windows)
            if split is None:
                raise ValueError(
                    f"tile axis of {mesh[1]} ranks cannot split the tile grid {grid} with at least one tile "
                    f"per rank; use mode='head' or fewer tile ranks"
                )
        else:
            split = check_triple("tile_split", split)
            if geometry.volume(split) != mesh[1] or any(p > n for p, n in zip(split, grid)):
                raise ValueError(
                    f"tile_split must multiply to the {mesh[1]} tile ranks and not exceed the grid {grid} "
                    f"on any axis, got tile_split={split}"
                )
        set_("mode", mode)
        set_("mesh", mesh)
        set_("tile_split", split)
        set_("reason", reason or f"mode={mode} as asked")

    def _choose_mode(self, grid: Triple, windows) -> tuple[str, Optional[tuple[int, int]], str]:
        """A mesh by :func:`choose_mesh` when head mode would leave ranks without a head;
        else head or tile mode, whichever the cost model prices lower for a call of the
        hinted windows (:meth:`modelled_modes`); with selected tiles (which the model of a
        plain call does not see), tile mode when its halo traffic is below head mode's
        all-to-all traffic."""
        P = self.world_size
        if P == 1:
            return "head", None, "auto: one rank, nothing to shard"
        if self.num_heads is not None and P > self.num_heads:
            mesh, why = choose_mesh(grid, P, windows, self.num_heads)
            mode = "tile" if mesh[0] == 1 else "head" if mesh[1] == 1 else "hybrid"
            return mode, mesh, f"auto: head mode would leave {P - self.num_heads} of {P} ranks without a head; {why}"
        split = best_tile_split(grid, P, windows)
        if split is None:
            return "head", None, f"auto: {P} ranks exceed the tiles along any split of grid {grid}"
        if not self.selected_tiles:
            times = self.modelled_modes(windows)
            mode = min(times, key=lambda m: (times[m], m))
            return mode, None, (f"auto: {mode} mode by the cost model, a call of the hinted windows "
                                + ", ".join(f"{m} {t:.2f} ms" for m, t in times.items()))
        boxes = geometry.rank_boxes(grid, split)
        halo = max(len(geometry.key_tiles(b, windows, grid)) - b.num_tiles
                   + expected_selected_halo(b, windows, grid, self.selected_tiles or 0) for b in boxes)
        held = max(b.num_tiles for b in boxes)
        # per rank, in tiles x heads: tile mode moves the k/v halo; head mode moves q, k, v
        # in and o out, (P - 1) / P of what it holds.
        tile_cost, head_cost = 2 * halo, 4 * held * (P - 1) / P
        if tile_cost < head_cost:
            return "tile", None, f"auto: tile mode, halo {halo:g} tiles/rank vs {held} held (split {split})"
        return "head", None, f"auto: head mode, halo {halo:g} tiles/rank would cost more than the all-to-all"

    def modelled_modes(self, windows: Sequence[Triple]) -> dict:
        """The cost model's time (ms, H100 rates) of one call in head and in tile mode with
        the hinted ``windows`` over the heads (``num_heads``, else one head per window, round
        robin), one sample, head dim 128, bf16, ``text_len`` text keys."""
        from .cost import H100_NVLINK, call_cost  # the model reads plans: imported when used

        heads = self.num_heads or len(windows)
        call = tuple(tuple(windows[h % len(windows)]) for h in range(heads))
        times = {}
        for mode in ("head", "tile"):
            plan = dataclasses.replace(self, mode=mode, mesh=None, reason="",
                                       tile_split=self.tile_split if mode == "tile" else None)
            times[mode] = call_cost(plan, call, heads, 1, 128, 2, self.text_len).time_ms(H100_NVLINK)
        return times

    @classmethod
    def from_config(cls, cfg, world_size: int, *, mode: Optional[str] = None, mesh: Optional[tuple[int, int]] = None,
                    strategy=None) -> "ShardPlan":
        """The one plan of a workload config on ``world_size`` ranks: what ``sta-dist run``
        runs, ``sta-dist plan`` shows and ``sta-dist doctor`` routes. ``cfg`` is a
        :class:`sta_dist.run.RunConfig` (or has its ``canvas``, ``tile``, ``text_len``,
        ``heads``, ``mode``, ``mesh`` and ``strategy()``); ``mode`` and ``mesh`` replace the
        config's (its mesh stays only with its mode); ``strategy``: the config's, if loaded.
        The plan expects the local windows (those short of the whole grid) of the
        strategy's last step, where real strategies are sparse; whole-canvas heads fall back
        to head mode per call."""
        if mode is None:
            mode = cfg.mode
            mesh = cfg.mesh if mesh is None else mesh
        strategy = cfg.strategy() if strategy is None else strategy
        grid = geometry.grid_shape(tuple(cfg.canvas), tuple(cfg.tile))
        local = {w for layer in strategy.windows[-1] for w in layer if not geometry.covers_grid(w, grid)}
        return cls(canvas=cfg.canvas, tile=cfg.tile, text_len=cfg.text_len, mode=mode, world_size=world_size,
                   mesh=mesh, windows=tuple(sorted(local)) or None, num_heads=cfg.heads,
                   head_chunks=getattr(cfg, "head_chunks", 1))

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

    def describe(self) -> str:
        return (f"mode={self.mode} mesh(head x tile)={self.mesh} tile_split={self.tile_split} "
                f"order={self.order} ({self.reason})")
