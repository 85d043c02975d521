"""sta_dist's tile (or auto) mode inside FastVideo's sequence-parallel group.

FastVideo shards the DiT's video tokens in contiguous natural-order chunks
(``sequence_model_parallel_shard`` after the patch embedding), and every
``DistributedAttention`` moves q, k, v to all tokens of ``H / P`` heads (all-to-all), applies
RoPE to the full sequence, and moves the output back (a second all-to-all). A tile mode on
those chunks would move the data twice (chunks to boxes, then halos), so this module makes
the model's own sharding tile-aligned instead, from outside the model:

- ``sequence_model_parallel_shard`` gives each rank the tokens of its box of tiles (the
  :class:`ShardPlan`'s packed order); ``sequence_model_parallel_all_gather`` and
  ``..._with_unpad`` put the boxes back into natural order. Norms, MLPs and modulation act
  per token, so they run on the boxes unchanged;
- ``DistributedAttention.forward`` applies RoPE to the rank's own tokens (the rows of
  ``freqs_cis`` at their positions) and runs sta_dist's plan: only the k/v halo moves, and
  the text rows are merged exactly (log-sum-exp), so each layer moves data once.

Training keeps FastVideo's own convention (its all-gather's adjoint is a reduce-scatter: a
rank's gradient of a replicated tensor is its share): the shard is an ``index_select``, the
gather's backward takes the rank's rows, and the text rows' gradients are converted at the
call (:mod:`sta_dist.integrations.training`).

On when ``STA_DIST_FASTVIDEO_PARALLEL`` (or ``install(parallel=...)``) is ``tile``, ``auto`` or
``hybrid``, the sequence-parallel group has more than one rank, and the call is FastVideo's
STA protocol with sta_dist's Impl; otherwise FastVideo's own functions run. It covers the
DiTs whose sequence-sharded tensors pass through those functions (HunyuanVideo, Wan 2.1);
mask search keeps FastVideo's head all-to-all.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ... import geometry
from ...config import check_triple
from ...geometry import Triple
from ...integrations import training
from ...parallel.comm import Comm
from ...parallel.plan import ShardPlan

PARALLEL_MODES = ("head", "tile", "auto", "hybrid")


@dataclass(frozen=True)
class Settings:
    parallel: str = "head"
    """``"head"``: FastVideo's own head all-to-all; ``"tile"``/``"auto"``/``"hybrid"``:
    sta_dist's plan over FastVideo's sequence-parallel group, with tile-aligned shards."""
    tile: Triple = (6, 8, 8)
    """The STA tile of FastVideo-driven calls."""

    def __post_init__(self) -> None:
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"STA_DIST_FASTVIDEO_PARALLEL (parallel=) must be one of {PARALLEL_MODES}, "
                             f"got {self.parallel!r}")
        object.__setattr__(self, "tile", check_triple("STA_DIST_FASTVIDEO_TILE (tile=)", self.tile))


_settings: Optional[Settings] = None


def settings() -> Settings:
    """The settings given to :func:`configure`, else read once from the environment
    (every DistributedAttention call asks)."""
    global _settings
    if _settings is None:
        tile = os.environ.get("STA_DIST_FASTVIDEO_TILE", "6,8,8")
        try:
            tile_triple = tuple(int(x) for x in tile.split(","))
        except ValueError:
            raise ValueError(f"STA_DIST_FASTVIDEO_TILE must be 't,h,w' ints, got {tile!r}") from None
        _settings = Settings(os.environ.get("STA_DIST_FASTVIDEO_PARALLEL", "head"), tile_triple)  # type: ignore[arg-type]
    return _settings


def configure(parallel: Optional[str] = None, tile=None) -> Settings:
    """Set what :func:`settings` returns; what is not given stays as it was."""
    global _settings
    base = settings()
    _settings = Settings(parallel or base.parallel, tuple(tile) if tile is not None else base.tile)
    return _settings


# -- the plan of a step ------------------------------------------------------------------


def _sp():
    from fastvideo.distributed import get_sp_group

    return get_sp_group()


@functools.lru_cache(maxsize=8)
def _comm(group) -> Comm:
    """One Comm (and its sub-groups) per sequence-parallel group, shared by all layers."""
    return Comm(group)


def _step_windows(meta) -> tuple[Triple, ...]:
    """The distinct windows of the step (FastVideo's rule), the plan's hint."""
    grid = geometry.grid_shape(tuple(meta.canvas), tuple(meta.tile))
    seen = set()
    for layer in meta.STA_param or ():
        for w in layer or ():
            if w is not None and len(w) == 3 and all(isinstance(x, int) for x in w):
                seen.add(geometry.fastvideo_window(tuple(w), grid))
    return tuple(sorted(seen)) or ((3, 3, 3),)


@functools.lru_cache(maxsize=64)
def _plan(canvas: Triple, tile: Triple, text_len: int, mode: str, world_size: int,
          windows: tuple[Triple, ...]) -> ShardPlan:
    return ShardPlan(canvas=canvas, tile=tile, text_len=text_len, mode=mode, world_size=world_size, windows=windows)


def plan_for(meta, text_len: int = 0) -> Optional[ShardPlan]:
    """The plan of this step's calls, or ``None`` where FastVideo's own path runs."""
    mode = settings().parallel
    if mode == "head" or getattr(meta, "protocol", None) != "fastvideo" or meta.canvas is None:
        return None
    group = _sp()
    if group.world_size == 1:
        return None
    base = _plan(tuple(meta.canvas), tuple(meta.tile), 0, mode, group.world_size, _step_windows(meta))
    return base if text_len == 0 else _with_text(base, text_len)


@functools.lru_cache(maxsize=64)
def _with_text(base: ShardPlan, text_len: int) -> ShardPlan:
    """The same shards (mode, mesh and boxes as resolved) with ``text_len`` text tokens."""
    return ShardPlan(canvas=base.canvas, tile=base.tile, text_len=text_len, mode=base.mode,
                     world_size=base.world_size, mesh=base.mesh if base.mode == "hybrid" else None,
                     tile_split=base.tile_split, windows=base.windows)


def _current_plan() -> Optional[ShardPlan]:
    from fastvideo.forward_context import _forward_context

    return None if _forward_context is None else plan_for(_forward_context.attn_metadata)


# -- the model's shard and gather points ---------------------------------------------------


def _gather_video(x: torch.Tensor, dim: int, plan: ShardPlan) -> torch.Tensor:
    """Every rank's box along ``dim`` -> the whole video in natural order (differentiable:
    the backward takes this rank's rows)."""
    own = plan.held_index(_sp().rank_in_group).to(x.device)
    return training.gather_rows(x, lambda y: _gather_boxes(y, dim, plan), own, dim)


def _gather_boxes(x: torch.Tensor, dim: int, plan: ShardPlan) -> torch.Tensor:
    group = _sp()
    x = x.movedim(dim, 0).contiguous()
    most = max(plan.held_count(r) for r in range(plan.world_size))
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(plan.world_size)]
    torch.distributed.all_gather(parts, padded, group=group.device_group)
    out = x.new_empty((plan.config.num_video, *x.shape[1:]))
    for r, part in enumerate(parts):
        out[plan.held_index(r).to(x.device)] = part[: plan.held_count(r)]
    return out.movedim(0, dim)


def patch_communication_op(module) -> None:
    """Wrap the shard and gather functions (once); they defer to FastVideo's unless the
    tensor is this step's video and tile mode is on."""
    if getattr(module.sequence_model_parallel_shard, "_sta_dist", False):
        return
    shard, gather, gather_unpad = (module.sequence_model_parallel_shard, module.sequence_model_parallel_all_gather,
                                   module.sequence_model_parallel_all_gather_with_unpad)

    def sequence_model_parallel_shard(input_: torch.Tensor, dim: int = 1):
        plan = _current_plan()
        if plan is None or input_.shape[dim] != plan.config.num_video:
            return shard(input_, dim)
        idx = plan.held_index(_sp().rank_in_group).to(input_.device)
        return input_.index_select(dim, idx), input_.shape[dim]

    def sequence_model_parallel_all_gather(input_: torch.Tensor, dim: int = -1):
        plan = _current_plan()
        if plan is None or dim % input_.dim() != 1 or input_.shape[1] != plan.held_count(_sp().rank_in_group):
            return gather(input_, dim)
        return _gather_video(input_, 1, plan)

    def sequence_model_parallel_all_gather_with_unpad(input_: torch.Tensor, original_seq_len: int, dim: int = -1):
        plan = _current_plan()
        if (plan is None or dim % input_.dim() != 1 or original_seq_len != plan.config.num_video
                or input_.shape[1] != plan.held_count(_sp().rank_in_group)):
            return gather_unpad(input_, original_seq_len, dim)
        return _gather_video(input_, 1, plan)

    for fn, orig in ((sequence_model_parallel_shard, shard), (sequence_model_parallel_all_gather, gather),
                     (sequence_model_parallel_all_gather_with_unpad, gather_unpad)):
        fn._sta_dist = True  # type: ignore[attr-defined]
        fn.__wrapped__ = orig  # type: ignore[attr-defined]
        fn.__doc__ = orig.__doc__
        setattr(module, fn.__name__, fn)


# -- DistributedAttention -----------------------------------------------------------------


def patch_attention_layer(module) -> None:
    """Wrap ``DistributedAttention.forward`` (once): sta_dist's plan where tile mode is on,
    FastVideo's own forward otherwise."""
    cls = module.DistributedAttention
    original = cls.forward
    if getattr(original, "_sta_dist", False):
        return

    @torch.compiler.disable
    def forward(self, q, k, v, replicated_q=None, replicated_k=None, replicated_v=None, freqs_cis=None,
                attention_mask=None):
        from fastvideo.forward_context import get_forward_context

        from ...backend import SlidingTileAttentionImpl

        meta = get_forward_context().attn_metadata
        plan = plan_for(meta) if isinstance(self.attn_impl, SlidingTileAttentionImpl) else None
        if plan is None or q.shape[1] != plan.held_count(_sp().rank_in_group):
            return original(self, q, k, v, replicated_q, replicated_k, replicated_v, freqs_cis, attention_mask)
        return tile_forward(self.attn_impl, meta, q, k, v, replicated_q, replicated_k, replicated_v, freqs_cis)

    forward._sta_dist = True  # type: ignore[attr-defined]
    forward.__wrapped__ = original  # type: ignore[attr-defined]
    cls.forward = forward


def tile_forward(impl, meta, q, k, v, replicated_q, replicated_k, replicated_v, freqs_cis):
    """``q, k, v [B, n_box, H, D]``: this rank's box (all heads); text ``[B, L, H, D]``
    replicated. Returns ``(out [B, n_box, H, D], text_out [B, L, H, D] or None)``."""
    from fastvideo.layers.rotary_embedding import _apply_rotary_emb

    group = _sp()
    n = q.shape[1]
    layer = impl.layer_windows(meta)
    if len(layer) != impl.num_heads:
        raise ValueError(
            f"mask search (STA_param[{impl.layer_idx}] lists {len(layer)} windows for {impl.num_heads} heads) "
            f"runs with FastVideo's head all-to-all: set STA_DIST_FASTVIDEO_PARALLEL=head for STA_searching"
        )
    if freqs_cis is not None:
        cos, sin = freqs_cis
        rows = plan_for(meta).held_index(group.rank_in_group).to(cos.device)
        q = _apply_rotary_emb(q, cos[rows], sin[rows], is_neox_style=False)
        k = _apply_rotary_emb(k, cos[rows], sin[rows], is_neox_style=False)
    L = 0 if replicated_q is None else replicated_q.shape[1]
    if L:
        q, k, v = (torch.cat([x, t], 1) for x, t in ((q, replicated_q), (k, replicated_k), (v, replicated_v)))
    call = dataclasses.replace(meta, plan=plan_for(meta, L), comm=_comm(group.device_group))
    from ...backend import plan_groups

    call.comm.make_groups(plan_groups(call.plan))
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        # training: the executor as one autograd Function (the hooks' call, the same bits);
        # the text rows' gradients a share per rank, as FastVideo's own are
        q, k, v = training.text_inputs((q, k, v), L, call.comm)
        out = training.text_output(impl.run_planned(q, k, v, call), L, call.comm)
    else:
        out = impl.postprocess_output(impl.forward(*impl.preprocess_qkv((q, k, v), call), call), call)
    return out[:, :n], (out[:, n:] if L else None)
