"""The public single-call entry point (:mod:`sta_dist.dispatch` runs it).

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .config import WindowArg
from .autograd import Problem, attention, needs_grad
from .dispatch import call_route, local_attention
from .local import LocalHeads, LocalText, call_layout, natural_order, sample_groups, tiled_order
from .route import Route
from .validation import check_call, check_causal, check_layout


def sliding_tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    canvas,
    tile,
    window: WindowArg,
    text_length=None,
    scale: Optional[float] = None,
    backend: str = "auto",
    layout: str = "natural",
    return_lse: bool = False,
    select=None,
    window_rule: str = "sta",
    return_selection: bool = False,
    causal: bool = False,
):
    """Sliding tile attention on one device.

    ``q [B, S, H, D]``, ``k, v [B, S, Hkv, D]`` with ``S = T*H*W + L``: the video tokens of
    ``canvas = (T, H, W)`` then ``L`` text tokens, of which the first ``text_length``
    (default ``L``) are valid: one int, or one per batch sample (a list, tuple or 1-D
    tensor; samples with different counts run as one launch per distinct count). ``window`` is one ``(kt, kh, kw)`` in tiles of ``tile`` or
    one per query head. ``layout="tiled"`` says the video tokens are already in tiled order
    (see :func:`to_tiled`); the output comes back in the input's order.

    ``backend``: ``"auto"`` (the fastest kernel that can run the call: on Hopper the CUDA
    kernel, elsewhere on a GPU the Triton kernel, off a GPU the torch backend),
    or one of ``"cuda"``, ``"triton"``, ``"torch"`` (refused with the reason if
    it cannot run the call). :func:`sta_dist.dispatch.call_route` says which runs and why.

    ``select`` adds key tiles chosen from the data to each query tile's window:
    :class:`sta_dist.TopK`, :class:`sta_dist.Mass` or a bool tile mask ``[B, H or 1, n, n]``
    (``window=None``: the selection alone); ``window_rule`` is ``"sta"`` (default),
    ``"fastvideo"`` or ``"clipped"`` (docs/design.md §1, :mod:`sta_dist.selection`).
    ``causal=True`` is refused (``ValueError``): the attention is bidirectional in its window.

    Returns ``out [B, S, H, D]`` in the input dtype, with ``return_lse`` also the
    log-sum-exp ``[B, H, S]`` in float32, and with ``return_selection`` also the key tiles
    each query tile attended, ``[B, 1 or H, n, n]`` bool (window and selection united).

    Differentiable (:mod:`sta_dist.autograd`) when grad mode is on and an input requires
    grad: ``out`` and the log-sum-exp, in ``q, k, v`` (the selection is not differentiated).
    """
    check_causal(causal)
    grad = needs_grad(q, k, v)
    if select is not None or window is None or window_rule != "sta" or return_selection:
        from .selection.attention import selected_attention

        return selected_attention(q, k, v, canvas=canvas, tile=tile, window=window, text_length=text_length,
                                  scale=scale, backend=backend, layout=layout, return_lse=return_lse, select=select,
                                  window_rule=window_rule, return_selection=return_selection, differentiable=grad)
    local, heads, text, scale = _local_call(q, k, v, canvas, tile, window, text_length, scale, layout)
    if grad:
        return attention(q, k, v, Problem(local, heads, text, scale, backend), return_lse)
    return local_attention(q, k, v, local, heads, text, scale, backend, return_lse)


def route_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, canvas, tile, window: WindowArg,
             text_length=None, backend: str = "auto", layout: str = "natural", return_lse: bool = False,
             causal: bool = False) -> Route:
    """Which kernels :func:`sliding_tile_attention` runs for these arguments, and why each
    faster one does not (:class:`sta_dist.route.Route`; nothing is computed). With
    per-sample text lengths: the route of the first sample's. A kernel named in
    ``backend`` that cannot run the call raises ``ValueError`` with the reason, as the call
    would. ``text`` names the kernel of the text query rows whenever the call has valid
    text: beside the CUDA kernel SDPA or Triton, else the kernel that takes the video rows
    (Triton or torch take the whole call), or SDPA where every head runs whole there."""
    check_causal(causal)
    local, heads, text, _ = _local_call(q, k, v, canvas, tile, window, text_length, None, layout)
    if not isinstance(text, LocalText):
        text = sample_groups(text)[0][0]
    r = call_route(q, k, v, local, heads, text, backend, return_lse)
    if text.q_valid and r.text is None:
        r = dataclasses.replace(r, text=r.video or "sdpa")
    return r


def _local_call(q, k, v, canvas, tile, window, text_length, scale, layout: str):
    """The checked arguments of a window-only call as one local problem: ``(layout,
    heads, text, scale)``, ``text`` one :class:`LocalText` or one per sample."""
    cfg, windows, text_length, scale, hkv = check_call(q, k, v, canvas, tile, window, text_length, scale)
    local = call_layout(cfg.canvas, cfg.tile, cfg.text_len, check_layout(layout))
    return local, LocalHeads.build(windows, cfg.grid, hkv), LocalText.per_sample(text_length), scale


def to_tiled(x: torch.Tensor, canvas, tile) -> torch.Tensor:
    """Reorder the video tokens of ``x [B, S, ...]`` from natural to tiled order; text
    tokens stay at the end."""
    return _reorder(x, canvas, tile, tiled_order)


def to_natural(x: torch.Tensor, canvas, tile) -> torch.Tensor:
    """Inverse of :func:`to_tiled`."""
    return _reorder(x, canvas, tile, natural_order)


def _reorder(x, canvas, tile, index_fn):
    from .config import STAConfig

    cfg = STAConfig(canvas=canvas, tile=tile)
    if x.dim() < 2 or x.shape[1] < cfg.num_video:
        raise ValueError(
            f"x must be [B, S, ...] with S >= T*H*W = {cfg.num_video}, got x.shape={tuple(x.shape)}"
        )
    idx = index_fn(cfg.canvas, cfg.tile, x.device)
    if x.shape[1] > cfg.num_video:  # one gather, text rows in place
        idx = torch.cat([idx, torch.arange(cfg.num_video, x.shape[1], device=x.device)])
    return x[:, idx]
