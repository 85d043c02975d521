"""The shard plan: a :class:`~sta_dist.parallel.layout.MeshLayout` (which tokens each rank
holds, on a (head axis x tile axis) mesh) with what it was chosen for.

``mode="head"`` is the mesh ``(P, 1)`` (box = whole grid), ``"tile"`` is ``(1, P)``,
``"hybrid"`` any ``(P_head, P_tile)``; ``"auto"`` one of them. What the plan leaves out
(the mode of ``auto``, the hybrid mesh, the tile split) is chosen by
:mod:`~sta_dist.parallel.decide` from the hints; the plan checks its arguments and keeps the
choice and its reason. Everything is pure and deterministic, so it is the same on every rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

from .. import geometry
from ..config import check_triple
from ..geometry import Triple
from . import decide
from .layout import MeshLayout, check_head_chunks, check_mesh, check_tile_split

MODES = ("head", "tile", "hybrid", "auto")


@dataclass(frozen=True, kw_only=True)
class ShardPlan(MeshLayout):
    """Which tokens each rank holds, and the mesh they are exchanged on.

    ``ShardPlan(canvas=(T, H, W), tile=(tt, th, tw), text_len=L, mode=..., world_size=P)``;
    ``mesh=(P_head, P_tile)`` for hybrid (default: chosen by :func:`~.decide.choose_mesh`);
    ``tile_split=(pt, ph, pw)`` to choose the boxes (default: the most balanced, then the
    smallest halo for ``windows``, :func:`~.decide.best_tile_split`); ``windows`` and
    ``num_heads`` are hints of the calls to expect, used by ``mode="auto"``
    (:func:`~.decide.auto_mode`), the default mesh and the default split. Afterwards
    ``mode`` is the concrete mode, ``mesh`` and ``tile_split`` are set, ``reason`` says why.
    """

    mode: str
    mesh: Optional[tuple[int, int]] = None
    tile_split: Optional[Triple] = None
    windows: Optional[tuple[Triple, ...]] = None
    num_heads: Optional[int] = None
    """How many query heads the calls will have (a hint): lets ``auto`` and ``hybrid``
    see ranks that head mode would leave without a head."""
    selected_tiles: Optional[float] = None
    """Key tiles each query tile will select beyond its window (a hint for ``auto``, e.g.
    ``k`` of ``TopK(k)``): the tiles a box's queries choose can lie anywhere, so tile mode
    fetches more than its window halo (:func:`~.decide.expected_selected_halo`)."""
    reason: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        self._check_config()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={self.mode!r}")
        self._check_fields()
        if self.windows is not None:
            set_("windows", tuple(check_triple("windows", w) for w in self.windows))
        if self.selected_tiles is not None and not (isinstance(self.selected_tiles, (int, float))
                                                    and 0 <= self.selected_tiles < float("inf")):
            raise ValueError(f"selected_tiles must be a number >= 0 or None, got selected_tiles={self.selected_tiles!r}")
        check_head_chunks(self.head_chunks)
        if self.num_heads is not None and (int(self.num_heads) != self.num_heads or self.num_heads < 1):
            raise ValueError(f"num_heads must be an int >= 1 or None, got num_heads={self.num_heads!r}")
        if self.mesh is not None and self.mode != "hybrid":
            raise ValueError(f"mesh=(P_head, P_tile) is for mode='hybrid' (head and tile modes have fixed meshes), "
                             f"got mesh={self.mesh!r} with mode={self.mode!r}")
        grid, P = self.grid, self.world_size
        windows = self.windows or ((3, 3, 3),)
        mode, mesh, reason = self.mode, self.mesh, self.reason
        if mode == "auto":
            mode, mesh, reason = decide.auto_mode(
                self.canvas, self.tile, self.text_len, P, windows, num_heads=self.num_heads,
                selected_tiles=self.selected_tiles, tile_split=self.tile_split, order=self.order,
                head_chunks=self.head_chunks)
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
            mesh, reason = decide.choose_mesh(grid, P, windows, self.num_heads, two_d=True)
            reason = f"hybrid: {reason}"
        mesh = check_mesh(mesh, P, self.mesh)
        split = self.tile_split
        if split is None:
            split = decide.best_tile_split(grid, mesh[1], windows)
            if split is None:
                raise ValueError(
                    f"tile axis of {mesh[1]} ranks cannot split the tile grid {grid} with at least one tile "
                    f"per rank; use mode='head' or fewer tile ranks"
                )
        else:
            split = check_tile_split(split, mesh[1], grid)
        set_("mode", mode)
        set_("mesh", mesh)
        set_("tile_split", split)
        set_("reason", reason or f"mode={mode} as asked")

    def modelled_modes(self, windows) -> dict:
        """The cost model's time (ms, H100 rates) of one call in head and in tile mode with
        ``windows`` over the plan's heads (:func:`~.decide.modelled_modes`; tile mode on the
        plan's split, or the default one for its hinted windows)."""
        split = self.tile_split or decide.best_tile_split(self.grid, self.world_size, self.windows or ((3, 3, 3),))
        return decide.modelled_modes(self.canvas, self.tile, self.text_len, self.world_size, windows, tile_split=split,
                                     num_heads=self.num_heads, order=self.order, head_chunks=self.head_chunks)

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

    def describe(self) -> str:
        return (f"mode={self.mode} mesh(head x tile)={self.mesh} tile_split={self.tile_split} "
                f"order={self.order} ({self.reason})")
