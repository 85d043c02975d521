"""The public single-call entry point and the backend choice.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import geometry
from .config import WindowArg
from .geometry import Triple
from .local import LocalHeads, LocalLayout, LocalText, sample_groups
from .torch_backend import sta_torch
from .triton_backend import can_run_triton, sta_triton
from .validation import check_call, check_layout, kernel_head_dim

BACKENDS = ("auto", "triton", "torch")


def choose_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """``"auto"`` takes the Triton kernel on a GPU and the torch backend elsewhere; an
    explicit request is checked and refused with the reason."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda and can_run_triton(q) else "torch"
    if backend == "triton":
        can_run_triton(q, raise_error=True)
    return backend


def _kernel(q_bshd, backend: str):
    """The chosen backend's call. The Triton kernels are built for head dims 32, 64, 96,
    128 and 256: other sizes of FastVideo's list (160, 192, 224) run zero-padded to the
    next of those."""
    if choose_backend(q_bshd, backend) != "triton":
        return sta_torch
    padded = kernel_head_dim(q_bshd.shape[-1])
    return sta_triton if padded == q_bshd.shape[-1] else functools.partial(_padded_triton, padded)


def _padded_triton(padded: int, q_bshd, k_bshd, v_bshd, layout, heads, text, scale, return_lse=False, keys=None):
    # Zero columns change no score q.k (the scale stays the caller's) and give zero
    # output columns, which are cut off again.
    D = q_bshd.shape[-1]
    q_p, k_p, v_p = (torch.nn.functional.pad(x, (0, padded - D)) for x in (q_bshd, k_bshd, v_bshd))
    result = sta_triton(q_p, k_p, v_p, layout, heads, text, scale, return_lse=return_lse, keys=keys)
    if return_lse:
        return result[0][..., :D].contiguous(), result[1]
    return result[..., :D].contiguous()


def local_attention(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text,
                    scale: float, backend: str = "auto", return_lse: bool = False, keys=None):
    """Run one local STA problem on the chosen backend (inputs already validated).

    ``text`` is one :class:`LocalText` for the whole batch, or a tuple of one per batch
    sample: then the batch is split into groups of samples with equal text, and each
    group runs as its own call (one kernel launch per distinct text length; a contiguous
    run of samples is a view, others are gathered). ``keys``: the table path
    (:class:`sta_dist.selection.tables.KeyTiles`), split with the batch."""
    kernel = _kernel(q_bshd, backend)
    run = kernel if keys is None else functools.partial(kernel, keys=keys)
    if isinstance(text, LocalText):
        return run(q_bshd, k_bshd, v_bshd, layout, heads, text, scale, return_lse=return_lse)
    groups = sample_groups(text)
    if len(groups) == 1:
        return run(q_bshd, k_bshd, v_bshd, layout, heads, groups[0][0], scale, return_lse=return_lse)
    B, S, H, _ = q_bshd.shape
    out = torch.empty_like(q_bshd)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q_bshd.device) if return_lse else None
    for group_text, idx in groups:
        if keys is not None:
            run = functools.partial(kernel, keys=keys.samples(idx))
        result = run(q_bshd[idx], k_bshd[idx], v_bshd[idx], layout, heads, group_text, scale, return_lse=return_lse)
        if return_lse:
            out[idx], lse[idx] = result
        else:
            out[idx] = result
    return (out, lse) if return_lse else out


@functools.lru_cache(maxsize=64)
def _layout(canvas: Triple, tile: Triple, text_len: int, order: str) -> LocalLayout:
    return (LocalLayout.natural if order == "natural" else LocalLayout.tiled)(canvas, tile, text_len)


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
):
    """Sliding tile attention on one device.

    ``q [B, S, H, D]``, ``k, v [B, S, Hkv, D]`` with ``S = T*H*W + L``: the video tokens of
    ``canvas = (T, H, W)`` then ``L`` text tokens, of which the first ``text_length``
    (default ``L``) are valid: one int, or one per batch sample (a list, tuple or 1-D
    tensor; samples with different counts run as one launch per distinct count). ``window`` is one ``(kt, kh, kw)`` in tiles of ``tile`` or
    one per query head. ``layout="tiled"`` says the video tokens are already in tiled order
    (see :func:`to_tiled`); the output comes back in the input's order.

    ``select`` adds key tiles chosen from the data to each query tile's window:
    :class:`sta_dist.TopK`, :class:`sta_dist.Mass` or a bool tile mask ``[B, H or 1, n, n]``
    (``window=None``: the selection alone); ``window_rule`` is ``"sta"`` (default),
    ``"fastvideo"`` or ``"clipped"`` (docs/design.md §1, :mod:`sta_dist.selection`).

    Returns ``out [B, S, H, D]`` in the input dtype, with ``return_lse`` also the
    log-sum-exp ``[B, H, S]`` in float32, and with ``return_selection`` also the key tiles
    each query tile attended, ``[B, 1 or H, n, n]`` bool (window and selection united).
    """
    if select is not None or window is None or window_rule != "sta" or return_selection:
        from .selection.attention import selected_attention

        return selected_attention(q, k, v, canvas=canvas, tile=tile, window=window, text_length=text_length,
                                  scale=scale, backend=backend, layout=layout, return_lse=return_lse, select=select,
                                  window_rule=window_rule, return_selection=return_selection)
    cfg, windows, text_length, scale, hkv = check_call(q, k, v, canvas, tile, window, text_length, scale)
    local = _layout(cfg.canvas, cfg.tile, cfg.text_len, check_layout(layout))
    heads = LocalHeads.build(windows, cfg.grid, hkv)
    return local_attention(q, k, v, local, heads, LocalText.per_sample(text_length), scale, backend, return_lse)


@functools.lru_cache(maxsize=64)
def _permutation(canvas: Triple, tile: Triple, device: torch.device) -> torch.Tensor:
    return geometry.tiled_permutation(canvas, tile).to(device)


@functools.lru_cache(maxsize=64)
def _inverse_permutation(canvas: Triple, tile: Triple, device: torch.device) -> torch.Tensor:
    return torch.argsort(_permutation(canvas, tile, device))


def to_tiled(x: torch.Tensor, canvas, tile) -> torch.Tensor:
    """Reorder the video tokens of ``x [B, S, ...]`` from natural to tiled order; text
    tokens stay at the end."""
    return _reorder(x, canvas, tile, _permutation)


def to_natural(x: torch.Tensor, canvas, tile) -> torch.Tensor:
    """Inverse of :func:`to_tiled`."""
    return _reorder(x, canvas, tile, _inverse_permutation)


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
