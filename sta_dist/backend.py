"""The seed API, named as FastVideo's ``fastvideo.attention.backends.sliding_tile_attn``.

Nothing is hard-coded: canvas, tile and text length come with the Impl or the metadata,
windows come from the metadata (one timestep's ``[layer][head]`` windows) and the Impl's
own ``layer_idx``. The hooks hold no state: what a call needs travels in the metadata.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .api import sliding_tile_attention, to_natural, to_tiled
from .config import STAConfig, normalize_windows
from .geometry import Triple
from .mask_strategy import MaskStrategy
from .parallel.comm import Comm
from .parallel.plan import ShardPlan
from .parallel.runtime import BoxInputs, attend, exchange_in, exchange_out
from .parallel.schedule import CallSchedule, call_schedule, warn_if_fallback
from .validation import (
    SUPPORTED_HEAD_DIMS,
    check_causal,
    check_head_dim,
    check_qkv,
    check_scale,
    check_text_length,
)

logger = logging.getLogger("sta_dist")


class RangeDict(dict):
    """A dict whose int lookups also match ``(low, high)`` range keys, both inclusive.

    An exact key wins over a range; among ranges the first inserted that holds the int wins.
    """

    def _resolve(self, key):
        if super().__contains__(key) or isinstance(key, bool) or not isinstance(key, int):
            return key
        for candidate in self.keys():
            if isinstance(candidate, tuple) and len(candidate) == 2 and candidate[0] <= key <= candidate[1]:
                return candidate
        return key

    def __getitem__(self, key):
        resolved = self._resolve(key)
        if not super().__contains__(resolved):
            raise KeyError(f"{key!r} matches no key or (low, high) range of {list(self.keys())}")
        return super().__getitem__(resolved)

    def __contains__(self, key) -> bool:
        return super().__contains__(self._resolve(key))

    def get(self, key, default=None):
        return self[key] if key in self else default


@dataclass
class SlidingTileAttentionMetadata:
    """What one attention call needs besides its tensors."""

    current_timestep: int
    STA_param: list = field(default_factory=list)
    """This timestep's windows: ``[num_layers][num_heads] -> (kt, kh, kw)``."""
    canvas: Optional[Triple] = None
    """Video latent ``(T, H, W)``; defaults to the Impl's."""
    tile: Optional[Triple] = None
    """Tile ``(tt, th, tw)``; defaults to the Impl's."""
    text_length: Optional[int] = None
    """Valid text tokens; defaults to all of them."""


class SlidingTileAttentionMetadataBuilder:
    def __init__(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def build(self, STA_param, current_timestep: int, **kwargs: Any) -> SlidingTileAttentionMetadata:
        """Select ``current_timestep``'s windows from ``STA_param`` (a :class:`MaskStrategy`
        or FastVideo's nested ``[step][layer][head]`` list). ``kwargs`` may give
        ``canvas``, ``tile`` and ``text_length``."""
        unknown = set(kwargs) - {"canvas", "tile", "text_length"}
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
        return SlidingTileAttentionMetadata(current_timestep=current_timestep, STA_param=layers, **kwargs)


class SlidingTileAttentionImpl:
    """STA for one attention layer.

    ``extra_impl_args``: ``layer_idx`` (which row of the metadata's windows is this
    layer's; may be left out when there is one layer), ``canvas``/``tile`` (defaults for
    calls whose metadata gives none), ``backend`` (``"auto"``, ``"triton"``, ``"torch"``),
    ``plan`` (a :class:`ShardPlan`: the call is distributed, its communication done in
    the hooks) and ``group`` (the plan's process group, default the world).

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
        unknown = set(extra_impl_args) - {"layer_idx", "canvas", "tile", "backend", "plan", "group"}
        if unknown:
            raise TypeError(f"SlidingTileAttentionImpl got unexpected extra_impl_args {sorted(unknown)}")
        self.layer_idx: Optional[int] = extra_impl_args.get("layer_idx")
        self.plan: Optional[ShardPlan] = extra_impl_args.get("plan")
        self.canvas = extra_impl_args.get("canvas") or (self.plan.canvas if self.plan else None)
        self.tile_size = extra_impl_args.get("tile") or (self.plan.tile if self.plan else None)
        self.backend = extra_impl_args.get("backend", "auto")
        self.comm: Optional[Comm] = None
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
        groups = []
        for r in range(plan.world_size):
            for g in (plan.head_group(r), plan.tile_group(r)):
                if g not in groups:
                    groups.append(g)
        self.comm.make_groups(groups)
        self.comm.check_agreement(
            "the attention config",
            f"{plan!r} heads={self.num_heads} kv_heads={self.num_kv_heads} head_size={self.head_size} "
            f"scale={self.softmax_scale} backend={self.backend}",
        )

    # -- layout helpers -------------------------------------------------------------
    def _config(self, attn_metadata: Optional[SlidingTileAttentionMetadata] = None) -> STAConfig:
        canvas = getattr(attn_metadata, "canvas", None) or self.canvas
        tile = getattr(attn_metadata, "tile", None) or self.tile_size
        if canvas is None or tile is None:
            raise ValueError(
                "canvas and tile must be given to the Impl (extra_impl_args) or in the metadata, "
                f"got canvas={canvas!r}, tile={tile!r}"
            )
        return STAConfig(canvas=canvas, tile=tile)

    def tile(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, ...]`` natural -> tiled order (text stays at the end)."""
        cfg = self._config()
        return to_tiled(x, cfg.canvas, cfg.tile)

    def untile(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self._config()
        return to_natural(x, cfg.canvas, cfg.tile)

    def layer_windows(self, attn_metadata: SlidingTileAttentionMetadata) -> Sequence[Triple]:
        layers = attn_metadata.STA_param
        if not layers:
            raise ValueError("attn_metadata.STA_param must hold this timestep's windows, got an empty list")
        if self.layer_idx is None:
            if len(layers) != 1:
                raise ValueError(
                    f"layer_idx must be given (extra_impl_args) when STA_param has several layers, "
                    f"got layer_idx=None with {len(layers)} layers"
                )
            return layers[0]
        if not 0 <= self.layer_idx < len(layers):
            raise IndexError(f"layer_idx must be in [0, {len(layers)}), got layer_idx={self.layer_idx}")
        return layers[self.layer_idx]

    # -- the hooks and the call -------------------------------------------------------
    def _schedule(self, attn_metadata: SlidingTileAttentionMetadata) -> CallSchedule:
        for name in ("canvas", "tile"):
            given = getattr(attn_metadata, name)
            if given is not None and tuple(given) != getattr(self.plan, name):
                raise ValueError(
                    f"attn_metadata.{name} must match the plan's {name}={getattr(self.plan, name)} "
                    f"(or be None), got {name}={tuple(given)}"
                )
        windows = normalize_windows(self.layer_windows(attn_metadata), self.num_heads)
        return call_schedule(self.plan, windows, self.num_kv_heads, self.comm.rank)

    def _text_length(self, attn_metadata: SlidingTileAttentionMetadata) -> int:
        return check_text_length(attn_metadata.text_length, self.plan.text_len)

    def _check_tensors(self, q, k, v) -> int:
        """``q, k, v`` against the Impl's head counts and head size; returns ``S``."""
        _, S, H, Hkv, D = check_qkv(q, k, v)
        if (H, Hkv, D) != (self.num_heads, self.num_kv_heads, self.head_size):
            raise ValueError(
                f"q/k/v must have num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads} and "
                f"head_size={self.head_size} (the Impl's), got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
            )
        return S

    def _check_local(self, q, k, v) -> None:
        S = self._check_tensors(q, k, v)
        expected = self.plan.held_count(self.comm.rank) + self.plan.text_len
        if S != expected:
            raise ValueError(
                f"rank {self.comm.rank}'s q/k/v must be [B, {expected}, H, D]: its "
                f"{self.plan.held_count(self.comm.rank)} video tokens plus {self.plan.text_len} text, "
                f"got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
            )

    def _check_call(self, q, k, v, attn_metadata: SlidingTileAttentionMetadata) -> None:
        """Check this rank's inputs, then that every rank makes the same call (windows, text
        length, batch, dtype): otherwise the exchanges would silently mix different
        problems. One 8-byte digest per call; a rank whose inputs are invalid makes every
        rank fail at once, instead of leaving its peers waiting in the next collective."""
        try:
            self._check_local(q, k, v)
            text_length = check_text_length(attn_metadata.text_length, self.plan.text_len, q.shape[0])
            windows = normalize_windows(self.layer_windows(attn_metadata), self.num_heads)
            description = (f"windows={windows} text_length={text_length} batch={q.shape[0]} "
                           f"dtype={q.dtype} device={q.device.type}")
            error = None
        except (ValueError, TypeError, IndexError) as err:
            description, error = f"invalid call ({type(err).__name__}: {err})", err
        self.comm.check_agreement("this call", description)
        if error is not None:
            raise error

    def preprocess_qkv(self, qkv, attn_metadata: SlidingTileAttentionMetadata):
        """Before ``forward``. On one device the kernel reads the natural order directly,
        so nothing moves. With a plan: the rank's local ``(q, k, v)`` (a tuple, or one
        tensor ``[3B, ...]`` when q and k have the same heads) -> the head all-to-all and
        the halo exchange -> the box inputs of this rank's heads."""
        if self.plan is None:
            return qkv
        q, k, v = qkv.chunk(3) if isinstance(qkv, torch.Tensor) else qkv
        self._check_call(q, k, v, attn_metadata)
        sched = self._schedule(attn_metadata)
        warn_if_fallback(sched, self.plan)
        return exchange_in(q, k, v, sched, self.comm)

    def postprocess_output(self, output, attn_metadata: SlidingTileAttentionMetadata) -> torch.Tensor:
        """After ``forward``. On one device nothing moves. With a plan: the text rows'
        exact merge and the inverse all-to-all -> this rank's tokens, all heads."""
        if self.plan is None:
            return output
        return exchange_out(output, self._schedule(attn_metadata), self.comm, self.num_heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: SlidingTileAttentionMetadata):
        """``q [B, S, H, D]``, ``k, v [B, S, Hkv, D]`` natural order -> ``[B, S, H, D]``.
        With a plan, ``q, k, v`` are ``preprocess_qkv``'s box inputs and the result is the
        partial output that ``postprocess_output`` finishes."""
        if self.plan is not None:
            return attend(BoxInputs(q, k, v), self._schedule(attn_metadata), self._text_length(attn_metadata),
                          self.softmax_scale, self.backend)
        self._check_tensors(q, k, v)
        cfg = self._config(attn_metadata)
        return sliding_tile_attention(
            q, k, v, canvas=cfg.canvas, tile=cfg.tile, window=self.layer_windows(attn_metadata),
            text_length=attn_metadata.text_length, scale=self.softmax_scale, backend=self.backend,
        )


class SlidingTileAttentionBackend:
    accept_output_buffer: bool = True

    @staticmethod
    def get_name() -> str:
        return "SLIDING_TILE_ATTN"

    @staticmethod
    def get_supported_head_sizes() -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @staticmethod
    def get_impl_cls() -> type[SlidingTileAttentionImpl]:
        return SlidingTileAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[SlidingTileAttentionMetadata]:
        return SlidingTileAttentionMetadata

    @staticmethod
    def get_builder_cls() -> type[SlidingTileAttentionMetadataBuilder]:
        return SlidingTileAttentionMetadataBuilder
