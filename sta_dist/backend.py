"""The seed API, named as FastVideo's ``fastvideo.attention.backends.sliding_tile_attn``.

One implementation, two ways in:

- **sta_dist's own code** gives canvas, tile and text length with the Impl or the
  metadata, windows in sta_dist's rule, tokens in natural order; with a :class:`ShardPlan`
  the hooks do the communication. Nothing is hard-coded and the hooks hold no state.
- **FastVideo's protocol** (and SGLang's copy of it): the Impl is built with FastVideo's
  keywords only (the layer index from ``prefix``), the builder gets FastVideo's arguments
  (``raw_latent_shape``, ``patch_size``, ...) and derives the canvas, so any resolution
  works; ``preprocess_qkv`` turns the stacked ``[3B, S, H_local, D]`` video into tiled
  order, ``forward`` reads tiled q/k/v with the text at the end and FastVideo's even-window
  rule, with the windows of this sequence-parallel rank's heads, ``postprocess_output``
  turns the video back into natural order. FastVideo's ``LocalAttention`` calls ``forward``
  alone, in natural order, with the same arguments: so this protocol, and only it, keeps
  one flag between the hooks (``_tiled_next``: ``preprocess_qkv`` handed out tiled order,
  and the next ``forward`` reads it and clears it). A ``STA_param`` layer with fewer
  windows than heads is FastVideo's mask search: candidates then the full window.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .api import sliding_tile_attention, to_natural, to_tiled
from .config import STAConfig, check_triple, normalize_windows
from .geometry import Triple, fastvideo_window
from .mask_strategy import MaskStrategy
from .parallel import call
from .parallel.comm import Comm
from .parallel.plan import ShardPlan
from .parallel.runtime import BoxInputs
from .parallel.decide import warn_if_fallback
from .parallel.schedule import CallSchedule
from .validation import (
    SUPPORTED_HEAD_DIMS,
    check_causal,
    check_head_dim,
    check_qkv,
    check_scale,
    check_text_length,
)

logger = logging.getLogger(__name__)

FASTVIDEO_TILE: Triple = (6, 8, 8)
"""FastVideo's STA tile (its ``STA_base_tile_size``): the tile of calls built from
FastVideo's builder arguments unless ``tile=`` is given."""
PROTOCOLS = ("sta_dist", "fastvideo")
_OWN_EXTRA_ARGS = {"layer_idx", "canvas", "tile", "backend", "plan", "group"}


def canvas_from_latent(raw_latent_shape, patch_size) -> Triple:
    """The DiT's token canvas ``(T, H, W)`` from the latent's ``(T, H, W)`` and the patch
    size (3 ints, or one int for the spatial axes with no temporal patching, as
    HunyuanVideo's config gives it), floored as the patch embedding does."""
    latent = check_triple("raw_latent_shape", list(raw_latent_shape)[-3:] if raw_latent_shape is not None else None)
    if isinstance(patch_size, int) or (hasattr(patch_size, "__index__") and not hasattr(patch_size, "__len__")):
        patch = (1, int(patch_size), int(patch_size))
    else:
        patch = check_triple("patch_size", patch_size)
    canvas = tuple(c // p for c, p in zip(latent, patch))
    if min(canvas) < 1:
        raise ValueError(f"raw_latent_shape {latent} is smaller than patch_size {patch} on some axis: "
                         f"canvas would be {canvas}")
    return canvas  # type: ignore[return-value]


def layer_index_from_prefix(prefix: str) -> Optional[int]:
    """FastVideo's layer index: ``prefix.split('.')[-3]`` (``'...blocks.7.attn.impl'`` -> 7);
    ``None`` when the prefix has none."""
    parts = str(prefix).split(".")
    if len(parts) >= 3 and parts[-3].isdigit():
        return int(parts[-3])
    return None


class RangeDict(dict):
    """FastVideo's: an int lookup matches a ``(low, high)`` key (both inclusive) or an
    equal key, the first match in insertion order wins, and the value comes back as
    ``str(value)``."""

    def _match(self, item):
        for key in self.keys():
            if isinstance(key, tuple) and len(key) == 2:
                if key[0] <= item <= key[1]:
                    return key
            elif key == item:
                return key
        raise KeyError(f"seq_len {item} not supported for STA: no key or (low, high) range of "
                       f"{list(self.keys())} holds it")

    def __getitem__(self, item) -> str:
        return str(super().__getitem__(self._match(item)))

    def __contains__(self, item) -> bool:
        try:
            self._match(item)
        except (KeyError, TypeError):
            return False
        return True

    def get(self, item, default=None):
        return self[item] if item in self else default


@dataclass
class SlidingTileAttentionMetadata:
    """What one attention call needs besides its tensors."""

    current_timestep: int
    STA_param: list = field(default_factory=list)
    """This timestep's windows: ``[num_layers][num_heads] -> (kt, kh, kw)``; in FastVideo's
    mask search a layer holds candidate windows and then the full window."""
    canvas: Optional[Triple] = None
    """Video latent ``(T, H, W)`` in tokens; defaults to the Impl's."""
    tile: Optional[Triple] = None
    """Tile ``(tt, th, tw)``; defaults to the Impl's."""
    text_length: Optional[int] = None
    """Valid text tokens; defaults to all of them."""
    protocol: str = "sta_dist"
    """``"fastvideo"`` when built from FastVideo's arguments: its window rule, its tiled
    order between the hooks, the windows of this sequence-parallel rank's heads."""
    plan: Optional[ShardPlan] = None
    """The shard plan of this call (defaults to the Impl's): set per call where the plan
    depends on the call, as inside FastVideo's sequence parallelism in tile mode."""
    comm: Optional[Comm] = None
    """The process group of ``plan`` (defaults to the Impl's)."""
    search_losses: list = field(default_factory=list)
    """Mask search: one ``{"L2_loss": [candidate][head], "L1_loss": ...}`` per searched layer
    call, in call order (FastVideo's Impl writes them into its ForwardBatch instead)."""


class SlidingTileAttentionMetadataBuilder:
    def __init__(self, tile: Optional[Triple] = None) -> None:
        self.tile = tile

    def prepare(self) -> None:
        pass

    def build(self, STA_param, current_timestep: int, **kwargs: Any) -> SlidingTileAttentionMetadata:
        """Select ``current_timestep``'s windows from ``STA_param`` (a :class:`MaskStrategy`
        or FastVideo's nested ``[step][layer][head]`` list).

        sta_dist's keywords: ``canvas``, ``tile``, ``text_length``. FastVideo's:
        ``raw_latent_shape`` (the latent's ``(T, H, W)``) and ``patch_size`` give the canvas
        (any resolution) and make the call FastVideo's protocol, with the builder's tile
        (default FastVideo's ``(6, 8, 8)``); ``VSA_sparsity`` and ``device`` are accepted
        and unused, as in FastVideo's own builder."""
        own = {"canvas", "tile", "text_length"}
        fastvideo = {"raw_latent_shape", "patch_size", "VSA_sparsity", "device"}
        unknown = set(kwargs) - own - fastvideo
        if unknown:
            raise TypeError(f"build() got unexpected keyword arguments {sorted(unknown)}")
        if STA_param is None:
            layers: list = []
        else:
            steps = STA_param.sta_param() if isinstance(STA_param, MaskStrategy) else STA_param
            if not 0 <= current_timestep < len(steps):
                raise IndexError(
                    f"current_timestep must be in [0, {len(steps)}) for this STA_param, "
                    f"got current_timestep={current_timestep}"
                )
            layers = steps[current_timestep]
        meta = {k: kwargs[k] for k in own if k in kwargs}
        if kwargs.get("raw_latent_shape") is not None:
            if "patch_size" not in kwargs:
                raise TypeError("build() with raw_latent_shape needs patch_size (FastVideo's dit_config.patch_size)")
            meta.setdefault("canvas", canvas_from_latent(kwargs["raw_latent_shape"], kwargs["patch_size"]))
            meta.setdefault("tile", self.tile or FASTVIDEO_TILE)
            meta["protocol"] = "fastvideo"
        return SlidingTileAttentionMetadata(current_timestep=current_timestep, STA_param=layers, **meta)


class SlidingTileAttentionImpl:
    """STA for one attention layer.

    ``extra_impl_args``: ``layer_idx`` (which row of the metadata's windows is this
    layer's; by default FastVideo's ``prefix.split('.')[-3]``, and may be left out when
    there is one layer), ``canvas``/``tile`` (defaults for calls whose metadata gives
    none), ``backend`` (``"auto"``, ``"triton"``, ``"torch"``), ``plan`` (a
    :class:`ShardPlan`: the call is distributed, its communication done in the hooks) and
    ``group`` (the plan's process group, default the world). Other keywords (FastVideo's
    layers pass model-specific ones, e.g. ``dropout_p``) are accepted and unused, as
    FastVideo's own Impl does.

    With a plan, ``preprocess_qkv`` takes the rank's local ``(q, k, v)`` and returns the
    box inputs, ``forward`` returns a partial output, ``postprocess_output`` returns the
    rank's local output; nothing is stored on the Impl between them.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        causal: bool,
        softmax_scale: Optional[float],
        num_kv_heads: Optional[int] = None,
        prefix: str = "",
        **extra_impl_args: Any,
    ) -> None:
        check_causal(causal)
        self.num_heads = num_heads
        self.head_size = check_head_dim(head_size)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if self.num_kv_heads < 1 or num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, "
                f"num_kv_heads={self.num_kv_heads}"
            )
        self.softmax_scale = check_scale(softmax_scale, head_size)
        self.prefix = prefix
        ignored = sorted(set(extra_impl_args) - _OWN_EXTRA_ARGS)
        if ignored:
            logger.debug("SlidingTileAttentionImpl %r ignores extra_impl_args %s", prefix, ignored)
        layer_idx = extra_impl_args.get("layer_idx")
        self.layer_idx: Optional[int] = layer_idx if layer_idx is not None else layer_index_from_prefix(prefix)
        self.plan: Optional[ShardPlan] = extra_impl_args.get("plan")
        self.canvas = extra_impl_args.get("canvas") or (self.plan.canvas if self.plan else None)
        self.tile_size = extra_impl_args.get("tile") or (self.plan.tile if self.plan else None)
        self.backend = extra_impl_args.get("backend", "auto")
        self.comm: Optional[Comm] = None
        self._tiled_next = False
        """FastVideo's protocol only: ``preprocess_qkv`` handed out tiled order, so the next
        ``forward`` reads tiled order (FastVideo's LocalAttention calls ``forward`` alone,
        in natural order). Cleared by that ``forward``."""
        if self.plan is not None:
            self._setup_distributed(extra_impl_args.get("group"))

    def _setup_distributed(self, group) -> None:
        """Sub-groups of the plan's mesh, and a check that every rank agrees on the config."""
        plan = self.plan
        if not isinstance(plan, ShardPlan):
            raise TypeError(f"plan must be a sta_dist.ShardPlan, got {type(plan).__name__}")
        self.comm = Comm(group)
        if self.comm.world_size != plan.world_size:
            raise ValueError(
                f"plan.world_size must equal the process group size {self.comm.world_size}, "
                f"got plan.world_size={plan.world_size}"
            )
        self.comm.make_groups(plan_groups(plan))
        self.comm.check_agreement(
            "the attention config",
            f"{plan!r} heads={self.num_heads} kv_heads={self.num_kv_heads} head_size={self.head_size} "
            f"scale={self.softmax_scale} backend={self.backend}",
        )

    # -- what a call is -------------------------------------------------------------
    def sequence_parallel(self) -> tuple[int, int]:
        """``(rank, size)`` of the sequence-parallel group whose head all-to-all ran before
        ``forward`` (FastVideo's protocol: this rank holds heads ``rank * H_local`` on).
        One process here; a client adapter overrides it with the client's group."""
        return 0, 1

    def _plan(self, attn_metadata) -> Optional[ShardPlan]:
        return getattr(attn_metadata, "plan", None) or self.plan

    def _comm(self, attn_metadata) -> Comm:
        return getattr(attn_metadata, "comm", None) or self.comm

    @staticmethod
    def _fastvideo(attn_metadata) -> bool:
        return getattr(attn_metadata, "protocol", "sta_dist") == "fastvideo"

    def _config(self, attn_metadata: Optional[SlidingTileAttentionMetadata] = None) -> STAConfig:
        canvas = getattr(attn_metadata, "canvas", None) or self.canvas
        tile = getattr(attn_metadata, "tile", None) or self.tile_size
        if canvas is None or tile is None:
            raise ValueError(
                "canvas and tile must be given to the Impl (extra_impl_args) or in the metadata "
                "(FastVideo's builder derives them from raw_latent_shape and patch_size), "
                f"got canvas={canvas!r}, tile={tile!r}"
            )
        return STAConfig(canvas=canvas, tile=tile)

    def tile(self, x: torch.Tensor, attn_metadata: Optional[SlidingTileAttentionMetadata] = None) -> torch.Tensor:
        """``x [B, S, ...]`` natural -> tiled order (text stays at the end)."""
        cfg = self._config(attn_metadata)
        return to_tiled(x, cfg.canvas, cfg.tile)

    def untile(self, x: torch.Tensor, attn_metadata: Optional[SlidingTileAttentionMetadata] = None) -> torch.Tensor:
        cfg = self._config(attn_metadata)
        return to_natural(x, cfg.canvas, cfg.tile)

    def layer_windows(self, attn_metadata: SlidingTileAttentionMetadata) -> Sequence:
        layers = attn_metadata.STA_param
        if not layers:
            raise ValueError("attn_metadata.STA_param must hold this timestep's windows, got an empty list "
                             "(FastVideo: is the mask strategy of FASTVIDEO_ATTENTION_CONFIG loaded?)")
        if self.layer_idx is None:
            if len(layers) != 1:
                raise ValueError(
                    f"layer_idx must be given (extra_impl_args, or a prefix '...<layer>.attn.impl') when "
                    f"STA_param has several layers, got layer_idx=None with {len(layers)} layers (prefix={self.prefix!r})"
                )
            return layers[0]
        if not 0 <= self.layer_idx < len(layers):
            raise IndexError(f"STA_param has no layer {self.layer_idx} (this Impl's layer_idx, prefix={self.prefix!r}): "
                             f"layer_idx must be in [0, {len(layers)}), got layer_idx={self.layer_idx}")
        return layers[self.layer_idx]

    def _fastvideo_windows(self, attn_metadata, grid: Triple, first_head: int, num_heads: int) -> tuple[Triple, ...]:
        """This call's heads' windows under FastVideo's rule, as sta_dist windows."""
        layer = self.layer_windows(attn_metadata)
        if len(layer) < first_head + num_heads:
            raise ValueError(
                f"STA_param[{self.layer_idx}] must give a window for heads {first_head}..{first_head + num_heads - 1} "
                f"(this rank's), got {len(layer)} windows"
            )
        out = []
        for h in range(first_head, first_head + num_heads):
            if layer[h] is None:
                raise ValueError(f"STA_param[{self.layer_idx}][{h}] is missing (None): the mask strategy must give "
                                 f"step {attn_metadata.current_timestep}, layer {self.layer_idx}, head {h}")
            out.append(fastvideo_window(check_triple(f"STA_param[{self.layer_idx}][{h}]", layer[h]), grid))
        return tuple(out)

    def _is_search(self, attn_metadata, num_local_heads: int) -> bool:
        """FastVideo's mask search: the layer does not list one window per head of all
        ranks but candidates, then the full window. (FastVideo's own test is "fewer than
        the heads"; its strategies always list exactly one per head, so a layer of any
        other length is a search, also where the candidates outnumber the heads.)"""
        return len(self.layer_windows(attn_metadata)) != num_local_heads * self.sequence_parallel()[1]

    def record_search(self, attn_metadata, losses: dict) -> None:
        """Where one layer call's search losses go; FastVideo's adapter writes them into
        its ForwardBatch."""
        attn_metadata.search_losses.append(losses)

    # -- the hooks and the call -------------------------------------------------------
    def _schedule(self, attn_metadata: SlidingTileAttentionMetadata, x_bshd: torch.Tensor,
                  windows=None) -> CallSchedule:
        """The hooks' schedule (:func:`~sta_dist.parallel.call.hooks_schedule`); ``x_bshd``:
        any of the call's tensors (batch, head dim and dtype)."""
        plan = self._plan(attn_metadata)
        for name in ("canvas", "tile"):
            given = getattr(attn_metadata, name)
            if given is not None and tuple(given) != getattr(plan, name):
                raise ValueError(
                    f"attn_metadata.{name} must match the plan's {name}={getattr(plan, name)} "
                    f"(or be None), got {name}={tuple(given)}"
                )
        if windows is None:
            windows = self._call_windows(attn_metadata, plan.grid)
        return call.hooks_schedule(plan, windows, self.num_kv_heads, self._comm(attn_metadata).rank, x_bshd,
                                   self._text_length(attn_metadata))

    def _call_windows(self, attn_metadata, grid: Triple) -> tuple[Triple, ...]:
        """All heads' windows of a planned call, in sta_dist's rule."""
        if self._fastvideo(attn_metadata):
            return self._fastvideo_windows(attn_metadata, grid, 0, self.num_heads)
        return normalize_windows(self.layer_windows(attn_metadata), self.num_heads)

    def _text_length(self, attn_metadata: SlidingTileAttentionMetadata) -> int:
        return check_text_length(attn_metadata.text_length, self._plan(attn_metadata).text_len)

    def _check_tensors(self, q, k, v) -> int:
        """``q, k, v`` against the Impl's head counts and head size; returns ``S``."""
        _, S, H, Hkv, D = check_qkv(q, k, v)
        if (H, Hkv, D) != (self.num_heads, self.num_kv_heads, self.head_size):
            raise ValueError(
                f"q/k/v must have num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads} and "
                f"head_size={self.head_size} (the Impl's), got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
            )
        return S

    def attention(self) -> call.Attention:
        """What this layer's distributed calls compute (:mod:`sta_dist.parallel.call`)."""
        return call.Attention(self.num_heads, self.num_kv_heads, self.head_size, self.softmax_scale, self.backend)

    def _check_call(self, q, k, v, attn_metadata: SlidingTileAttentionMetadata) -> call.CallRequest:
        """This rank's inputs checked and every rank's call agreed on
        (:func:`~sta_dist.parallel.call.check_call`), the windows from the metadata."""
        plan = self._plan(attn_metadata)
        return call.check_call(q, k, v, self.attention(), plan, self._comm(attn_metadata),
                               lambda: self._call_windows(attn_metadata, plan.grid), attn_metadata.text_length)

    def preprocess_qkv(self, qkv, attn_metadata: SlidingTileAttentionMetadata):
        """Before ``forward``.

        - With a plan: the rank's local ``(q, k, v)`` (a tuple, or one tensor ``[3B, ...]``
          when q and k have the same heads) -> the head all-to-all and the halo exchange ->
          the box inputs of this rank's heads.
        - FastVideo's protocol: the stacked ``[3B, S, H_local, D]`` video in natural order
          -> tiled order (FastVideo's contract; text appended after this stays at the end).
        - Otherwise nothing moves: the kernel reads the natural order directly."""
        if self._plan(attn_metadata) is not None:
            q, k, v = qkv.chunk(3) if isinstance(qkv, torch.Tensor) else qkv
            request = self._check_call(q, k, v, attn_metadata)
            sched = self._schedule(attn_metadata, q, request.windows)
            warn_if_fallback(sched, self._plan(attn_metadata))
            return call.stage_in(q, k, v, sched, self._comm(attn_metadata))
        if self._fastvideo(attn_metadata):
            cfg = self._config(attn_metadata)
            self._check_video_tokens(qkv, cfg, attn_metadata)
            self._tiled_next = True
            return to_tiled(qkv, cfg.canvas, cfg.tile)
        return qkv

    def run_planned(self, q, k, v, attn_metadata: SlidingTileAttentionMetadata, parts=None,
                    overlap: bool = True) -> torch.Tensor:
        """The three hooks as one call (with a plan): :func:`sta_dist.parallel.call.run`, the
        executor (``parts``: a split of the heads of the caller's own, the same on every
        rank; ``overlap=False``: the staged order, the same result bit for bit)."""
        request = self._check_call(q, k, v, attn_metadata)
        return call.run(q, k, v, request, self.attention(), self._plan(attn_metadata), self._comm(attn_metadata),
                        overlap=overlap, parts=parts)

    def postprocess_output(self, output, attn_metadata: SlidingTileAttentionMetadata) -> torch.Tensor:
        """After ``forward``. With a plan: the text rows' exact merge and the inverse
        all-to-all -> this rank's tokens, all heads. FastVideo's protocol: tiled -> natural
        order. Otherwise nothing moves."""
        if self._plan(attn_metadata) is not None:
            comm = self._comm(attn_metadata)
            out = call.stage_out(output, self._schedule(attn_metadata, output.out_bshd), comm, self.num_heads)
            comm.settle_agreements()  # a call the ranks disagreed on returns no output
            return out
        if self._fastvideo(attn_metadata):
            cfg = self._config(attn_metadata)
            return to_natural(output, cfg.canvas, cfg.tile)
        return output

    def _check_video_tokens(self, x: torch.Tensor, cfg: STAConfig, attn_metadata) -> None:
        if x.dim() != 4 or x.shape[1] < cfg.num_video:
            raise ValueError(
                f"the sequence must hold the canvas {cfg.canvas} = {cfg.num_video} video tokens (from "
                f"raw_latent_shape and patch_size, or canvas=) then text, got shape {tuple(x.shape)}"
            )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: SlidingTileAttentionMetadata):
        """``q [B, S, H, D]``, ``k, v [B, S, Hkv, D]`` natural order -> ``[B, S, H, D]``.
        With a plan, ``q, k, v`` are ``preprocess_qkv``'s box inputs and the result is the
        partial output that ``postprocess_output`` finishes. In FastVideo's protocol the
        order is tiled after ``preprocess_qkv`` (natural when ``forward`` is called alone)
        and ``H`` is this rank's share of the heads."""
        tiled, self._tiled_next = self._tiled_next, False
        plan = self._plan(attn_metadata)
        if plan is not None:
            return call.stage_attend(BoxInputs(q, k, v), self._schedule(attn_metadata, q),
                                     self._text_length(attn_metadata), self.attention())
        if self._fastvideo(attn_metadata):
            return self._forward_fastvideo(q, k, v, attn_metadata, "tiled" if tiled else "natural")
        self._check_tensors(q, k, v)
        cfg = self._config(attn_metadata)
        return sliding_tile_attention(
            q, k, v, canvas=cfg.canvas, tile=cfg.tile, window=self.layer_windows(attn_metadata),
            text_length=attn_metadata.text_length, scale=self.softmax_scale, backend=self.backend,
        )

    def _forward_fastvideo(self, q, k, v, attn_metadata, layout: str) -> torch.Tensor:
        _, _, H, Hkv, D = check_qkv(q, k, v)
        if D != self.head_size:
            raise ValueError(f"q/k/v must have head_size={self.head_size} (the Impl's), got q.shape={tuple(q.shape)}")
        cfg = self._config(attn_metadata)
        self._check_video_tokens(q, cfg, attn_metadata)
        rank, _ = self.sequence_parallel()
        run = dict(canvas=cfg.canvas, tile=cfg.tile, text_length=attn_metadata.text_length,
                   scale=self.softmax_scale, backend=self.backend, layout=layout)
        if self._is_search(attn_metadata, H):
            return self._search(q, k, v, attn_metadata, cfg.grid, run)
        windows = self._fastvideo_windows(attn_metadata, cfg.grid, rank * H, H)
        return sliding_tile_attention(q, k, v, window=windows, **run)

    def _search(self, q, k, v, attn_metadata, grid: Triple, run: dict) -> torch.Tensor:
        """FastVideo's mask search: every candidate window for all heads, and the full
        window (the last entry), whose output is returned; the per-head mean L2 and L1
        distances of each candidate's output to it are recorded (FastVideo's format)."""
        layer = self.layer_windows(attn_metadata)
        windows = [fastvideo_window(check_triple(f"STA_param[{self.layer_idx}][{i}]", w), grid)
                   for i, w in enumerate(layer)]
        full = sliding_tile_attention(q, k, v, window=windows[-1], **run)
        l2, l1 = [], []
        for window in windows[:-1]:
            diff = sliding_tile_attention(q, k, v, window=window, **run).float() - full.float()
            l2.append([round(float(x), 6) for x in diff.square().mean(dim=(0, 1, 3))])
            l1.append([round(float(x), 6) for x in diff.abs().mean(dim=(0, 1, 3))])
        self.record_search(attn_metadata, {"L2_loss": l2, "L1_loss": l1})
        return full


def plan_groups(plan: ShardPlan) -> list[tuple[int, ...]]:
    """The sub-groups a plan's calls use (head groups and tile groups), in one order on
    every rank: creating them is collective."""
    groups: list[tuple[int, ...]] = []
    for r in range(plan.world_size):
        for g in (plan.head_group(r), plan.tile_group(r)):
            if g not in groups:
                groups.append(g)
    return groups


class SlidingTileAttentionBackend:
    accept_output_buffer: bool = True
    classes: tuple = (SlidingTileAttentionImpl, SlidingTileAttentionMetadata, SlidingTileAttentionMetadataBuilder)
    """Impl, metadata and builder; a client's subclass (FastVideo's adapter) names its own."""

    @staticmethod
    def get_name() -> str:
        return "SLIDING_TILE_ATTN"

    @staticmethod
    def get_supported_head_sizes() -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def get_impl_cls(cls) -> type[SlidingTileAttentionImpl]:
        return cls.classes[0]

    @classmethod
    def get_metadata_cls(cls) -> type[SlidingTileAttentionMetadata]:
        return cls.classes[1]

    @classmethod
    def get_builder_cls(cls) -> type[SlidingTileAttentionMetadataBuilder]:
        return cls.classes[2]
