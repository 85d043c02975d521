"""How each kernel is called on one local problem (a :mod:`sta_dist.local` description):
the device tables of a layout, the Triton and CUDA launches, and SDPA for dense
heads and text queries. No decisions here: :mod:`sta_dist.route` decides which of these
run, :mod:`sta_dist.dispatch` runs them.

Triton is imported lazily: the package works without it (the torch backend), and the
interpreter (``TRITON_INTERPRET=1``) must be chosen before triton is first imported.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import geometry
from .local import LocalHeads, LocalLayout, LocalText, head_index


@dataclass(frozen=True)
class LayoutFacts:
    """What the launch needs to know of a layout, computed once per (layout, device)."""

    q_tiles: torch.Tensor
    kv_tiles: torch.Tensor
    even: bool
    """Whole tiles only (the canvas divides by the tile)."""
    packed: bool
    """Every present k/v tile is consecutive rows (tiled storage)."""
    q_packed: bool
    """Every query tile is consecutive rows."""
    natural: bool
    """k/v hold the whole canvas in natural order."""
    complete: bool
    """Every query and key tile present, text queries see exactly the video keys."""
    whole_natural: bool
    """q and k/v hold the whole canvas in natural order, then the text."""
    kv_video: int
    """The first text key row."""

    @property
    def packed_tables(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The Hopper kernels' "packed" tables: per query tile (global id, first row), per
        global tile its first k/v row, and the first text key row."""
        return self.q_tiles, self.kv_tiles, self.kv_video


@functools.lru_cache(maxsize=64)
def layout_facts(layout: LocalLayout, device: torch.device) -> LayoutFacts:
    q_tiles = torch.tensor(
        [[gid, r.base, r.stride_t, r.stride_h] for gid, r in zip(layout.q_tiles, layout.q_rows)],
        dtype=torch.int32,
    ).reshape(-1, 4)
    kv_tiles = torch.tensor(
        [[r.base, r.stride_t, r.stride_h] if r is not None else [0, 0, 0] for r in layout.kv_rows],
        dtype=torch.int32,
    ).reshape(-1, 3)
    th, tw = layout.tile[1], layout.tile[2]

    def consecutive(r) -> bool:  # a tile's rows follow each other (tiled storage)
        return r.stride_t == th * tw and r.stride_h == tw

    return LayoutFacts(
        q_tiles.to(device),
        kv_tiles.to(device),
        even=all(c % t == 0 for c, t in zip(layout.canvas, layout.tile)),
        packed=all(r is None or consecutive(r) for r in layout.kv_rows),
        q_packed=all(consecutive(r) for r in layout.q_rows),
        natural=layout.kv_rows == tuple(geometry.natural_tile_rows(layout.canvas, layout.tile)),
        complete=(len(layout.q_tiles) == len(layout.kv_rows) and all(r is not None for r in layout.kv_rows)
                  and layout.text_q_video_keys == layout.kv_video and layout.q_video == layout.kv_video),
        whole_natural=layout == LocalLayout.natural(layout.canvas, layout.tile, layout.q_text),
        kv_video=layout.kv_video,
    )


def packed_tables(layout: LocalLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The Hopper kernels' "packed" tables for ``layout`` (see ``LayoutFacts.packed_tables``)."""
    return layout_facts(layout, device).packed_tables


@functools.lru_cache(maxsize=64)
def halo_tables(layout: LocalLayout, halo_from: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The CUDA kernel's packed tables for ``layout`` with its k/v rows from ``halo_from``
    on held apart, in a second pair of tensors (a tile-mode rank's halo as received): their
    ``kv_tiles`` entries become ``~(row - halo_from)``, and the text keys, which follow the
    box in the first pair, start at row ``halo_from``."""
    q_tiles, kv_tiles, _ = packed_tables(layout, device)
    first = kv_tiles[:, :1]
    moved = torch.where(first >= halo_from, ~(first - halo_from), first)
    return q_tiles, torch.cat([moved, kv_tiles[:, 1:]], 1).contiguous(), halo_from


@functools.lru_cache(maxsize=256)
def head_table(heads: LocalHeads, subset: tuple[int, ...], device: torch.device) -> torch.Tensor:
    rows = [[*heads.windows[h], heads.kv_heads[h], h] for h in subset]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 5).to(device)


def dense_heads(layout: LocalLayout, heads: LocalHeads, text: LocalText, complete: bool) -> tuple[int, ...]:
    """Heads that are plain dense attention here: their window is the whole grid, the
    layout is ``complete`` and every text row sees the same keys as the video rows.
    Those go to the best dense kernel (cuDNN through SDPA)."""
    if not (complete and text.kv_for_video_q == text.kv_for_text_q == text.q_valid):
        return ()
    return tuple(h for h, w in enumerate(heads.windows) if geometry.covers_grid(w, layout.grid))


def sdpa_dense(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText,
                subset: tuple[int, ...], scale: float, out: torch.Tensor | None):
    """Dense attention of the ``subset`` heads for every query row, into ``out``: keys
    are every video token and the valid text; padding text rows are zero. With ``out=None`` (every
    head, every row valid) SDPA's own output is returned as ``[B, S, H, D]``, no copy."""
    n_keys = layout.kv_video + text.kv_for_video_q
    if out is None:
        o = _sdpa(q_bshd, k_bshd, v_bshd, heads, subset, 0, layout.q_video + text.q_valid, n_keys, scale)
        return o.transpose(1, 2).contiguous()  # cuDNN writes [B, S, H, D] order already: a no-op
    _sdpa_into(q_bshd, k_bshd, v_bshd, heads, subset, 0, layout.q_video + text.q_valid, n_keys, scale, out)
    return out


def text_by_sdpa(layout: LocalLayout, text: LocalText) -> bool:
    """Whether text queries are plain dense attention (SDPA): their keys (the video rows
    ``[0, text_q_video_keys)``, then ``kv_for_text_q`` text rows) are one range of k/v."""
    keys = layout.text_q_video_keys + text.kv_for_text_q
    return keys > 0 and (text.kv_for_text_q == 0 or layout.text_q_video_keys == layout.kv_video)


def sdpa_text(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText,
              subset: tuple[int, ...], scale: float, out: torch.Tensor, lse: torch.Tensor | None = None) -> None:
    """The text query rows of the ``subset`` heads by SDPA (:func:`text_by_sdpa` holds),
    into ``out``, and with ``lse`` their log-sum-exp (FlashAttention's, which returns it);
    padding text rows get zero output and log-sum-exp ``-inf``."""
    n_keys = layout.text_q_video_keys if text.kv_for_text_q == 0 else layout.kv_video + text.kv_for_text_q
    _sdpa_into(q_bshd, k_bshd, v_bshd, heads, subset, layout.q_video, layout.q_video + text.q_valid, n_keys, scale,
               out, lse)


def _sdpa(q_bshd, k_bshd, v_bshd, heads: LocalHeads, subset: tuple[int, ...], first: int, valid: int, n_keys: int,
          scale: float, with_lse: bool = False):
    """SDPA of the ``subset`` heads' query rows ``[first, valid)`` over the key rows
    ``[0, n_keys)``: ``[B, h, n, D]`` (cuDNN first), or with ``with_lse`` FlashAttention's
    ``(output, log-sum-exp [B, h, n])``."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    idx = head_index(subset, q_bshd.device)
    kv_idx = head_index([heads.kv_heads[h] for h in subset], q_bshd.device)
    q = q_bshd[:, first:valid][:, :, idx].transpose(1, 2)
    k, v = (x[:, :n_keys][:, :, kv_idx].transpose(1, 2) for x in (k_bshd, v_bshd))
    if with_lse:
        o, rows_lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
        return o, rows_lse[:, :, :valid - first]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _sdpa_into(q_bshd, k_bshd, v_bshd, heads: LocalHeads, subset: tuple[int, ...], first: int, valid: int,
               n_keys: int, scale: float, out: torch.Tensor, lse: torch.Tensor | None = None) -> None:
    """:func:`_sdpa` written into ``out`` (and ``lse``) at rows ``[first, valid)``; the rows
    after them (padding text) get zero output and log-sum-exp ``-inf``."""
    idx = head_index(subset, q_bshd.device)
    if valid > first and lse is None:
        out[:, first:valid, idx] = _sdpa(q_bshd, k_bshd, v_bshd, heads, subset, first, valid, n_keys,
                                         scale).transpose(1, 2)
    elif valid > first:
        o, rows_lse = _sdpa(q_bshd, k_bshd, v_bshd, heads, subset, first, valid, n_keys, scale, with_lse=True)
        out[:, first:valid, idx] = o.transpose(1, 2)
        lse[:, idx, first:valid] = rows_lse
    if lse is not None:
        lse[:, idx, valid:] = float("-inf")
    out[:, valid:, idx] = 0


@functools.lru_cache(maxsize=16)
def text_stream(device: torch.device) -> torch.cuda.Stream:
    """A second stream per device for the text queries, so their launch runs beside the
    Hopper kernel's instead of before it (it has a few dozen programs; the GPU has ~132
    multiprocessors)."""
    return torch.cuda.Stream(device=device)


def triton_args(layout: LocalLayout, text: LocalText, facts: LayoutFacts, scale: float, return_lse: bool) -> dict:
    """``sta_fwd``'s keyword arguments that describe the local problem."""
    return dict(
        canvas=layout.canvas, tile=layout.tile,
        q_video=layout.q_video, q_text=layout.q_text, kv_video=layout.kv_video,
        text_q_video_keys=layout.text_q_video_keys,
        q_text_valid=text.q_valid, kv_text_for_video=text.kv_for_video_q, kv_text_for_text=text.kv_for_text_q,
        scale=scale, even=facts.even, packed=facts.packed, natural=facts.natural, return_lse=return_lse,
    )


def triton(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText, scale: float,
           subset: tuple[int, ...], out=None, return_lse: bool = False, config: dict | None = None, keys=None,
           lse=None, video: bool = True):
    """The Triton kernel for the ``subset`` heads, into ``out`` (``None``: a new tensor);
    ``video=False``: the text query rows alone (a launch with no video query tiles).
    Returns ``out``, or ``(out, lse)`` with ``return_lse``. ``keys``: the table path."""
    from .kernels.sta_fwd import sta_fwd

    facts = layout_facts(layout, q_bshd.device)
    q_tiles = facts.q_tiles if video else facts.q_tiles[:0]
    return sta_fwd(q_bshd, k_bshd, v_bshd, q_tiles, facts.kv_tiles, head_table(heads, subset, q_bshd.device),
                   config=config, keys=keys, out=out, lse=lse, clip=clip(layout),
                   **triton_args(layout, text, facts, scale, return_lse))


def clip(layout: LocalLayout):
    """The kernels' ``clip`` for the layout's ``key_box`` (``None``: no cut)."""
    return None if layout.key_box is None else (layout.key_box.lo, layout.key_box.hi)


def cuda(q_bshd, k_bshd, v_bshd, layout: LocalLayout, text: LocalText, scale: float, table: torch.Tensor, out,
         lse=None, keys=None, halo=None, resume: bool = False):
    """The CUDA kernel: the video rows of ``out`` (and ``lse``) for the heads of ``table``,
    reading natural order or packed tiles through the layout's tables; ``keys``: the table
    path; ``halo``: a :class:`~sta_dist.local.Halo`, the layout's k/v rows from its
    ``first_row`` on, where they lie (:func:`halo_tables`); ``resume``: fold this call's keys
    into the result ``out`` and ``lse`` hold."""
    from .kernels.sta_fwd_cuda import sta_fwd_cuda

    facts = layout_facts(layout, q_bshd.device)
    tables = facts.packed_tables if halo is None else halo_tables(layout, halo.first_row, q_bshd.device)
    return sta_fwd_cuda(q_bshd, k_bshd, v_bshd, table, out, canvas=layout.canvas, tile=layout.tile, scale=scale,
                        text_keys=text.kv_for_video_q, order="natural" if facts.whole_natural else "packed",
                        tables=tables, lse=lse, keys=keys, halo=None if halo is None else (halo.k, halo.v),
                        clip=clip(layout), resume=resume)
