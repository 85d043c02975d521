"""Adapter from a :mod:`sta_dist.local` description to the Triton kernel launch.

Triton is imported lazily: the package works without it (the torch backend), and the
interpreter (``TRITON_INTERPRET=1``) must be chosen before triton is first imported.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from . import geometry
from .local import LocalHeads, LocalLayout, LocalText, head_index


def can_run_triton(q: torch.Tensor, raise_error: bool = False) -> bool:
    """Whether the Triton kernel can run on ``q``'s device; with ``raise_error`` the
    refusal says why."""
    reason = None
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or (interpreted and q.device.type == "cpu")):
        reason = (
            f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported), got q.device={q.device}"
        )
    else:
        try:
            import triton  # noqa: F401
        except ImportError as err:
            reason = f"the triton backend needs the triton package: {err}"
    if reason and raise_error:
        raise RuntimeError(reason)
    return reason is None


@dataclass(frozen=True)
class _LayoutFacts:
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
    def gluon_tables(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The Gluon kernel's "packed" tables: per query tile (global id, first row), per
        global tile its first k/v row, and the first text key row."""
        return self.q_tiles, self.kv_tiles, self.kv_video


@functools.lru_cache(maxsize=64)
def _layout_facts(layout: LocalLayout, device: torch.device) -> _LayoutFacts:
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

    return _LayoutFacts(
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


def gluon_tables(layout: LocalLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The Gluon kernel's "packed" tables for ``layout`` (see ``_LayoutFacts.gluon_tables``)."""
    return _layout_facts(layout, device).gluon_tables


@functools.lru_cache(maxsize=256)
def _head_table(heads: LocalHeads, subset: tuple[int, ...], device: torch.device) -> torch.Tensor:
    rows = [[*heads.windows[h], heads.kv_heads[h], h] for h in subset]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 5).to(device)


def dense_heads(layout: LocalLayout, heads: LocalHeads, text: LocalText, complete: bool) -> tuple[int, ...]:
    """Heads that are plain dense attention here: their window is the whole grid, the
    layout is ``complete`` and every text row sees the same keys as the video rows.
    Those go to the best dense kernel (cuDNN through SDPA)."""
    if not (complete and text.kv_for_video_q == text.kv_for_text_q == text.q_valid):
        return ()
    return tuple(h for h, w in enumerate(heads.windows) if geometry.covers_grid(w, layout.grid))


def _sdpa_dense(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText,
                subset: tuple[int, ...], scale: float, out: torch.Tensor | None, first_row: int = 0):
    """Dense attention of the ``subset`` heads for the query rows from ``first_row`` on,
    into ``out``: keys are every video token and the valid text; padding text rows are
    zero. (``first_row = q_video``: the text queries alone.) With ``out=None`` (every
    head, every row valid) SDPA's own output is returned as ``[B, S, H, D]``, no copy."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n_keys = layout.kv_video + text.kv_for_video_q
    valid_rows = layout.q_video + text.q_valid
    idx, kv_idx = head_index(subset), head_index([heads.kv_heads[h] for h in subset])
    q = q_bshd[:, first_row:valid_rows][:, :, idx]
    k, v = (x[:, :n_keys][:, :, kv_idx] for x in (k_bshd, v_bshd))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    if out is None:
        return o.transpose(1, 2).contiguous()  # cuDNN writes [B, S, H, D] order already: a no-op
    out[:, first_row:valid_rows, idx] = o.transpose(1, 2)
    out[:, valid_rows:, idx] = 0
    return out


def _gluon_order(facts: _LayoutFacts) -> str | None:
    """How the Gluon kernel would read this call's video tokens: "natural" (the whole
    canvas in natural order), "packed" (whole tiles of consecutive rows: tiled order, a
    head-mode rank, a tile-mode rank's box and halo), or ``None``."""
    if facts.whole_natural:
        return "natural"
    return "packed" if facts.even and facts.packed and facts.q_packed else None


def _text_by_sdpa(layout: LocalLayout, text: LocalText) -> bool:
    """Whether text queries are plain dense attention (SDPA): they see every local video
    key and the same valid text keys as the video queries."""
    return text.kv_for_video_q == text.kv_for_text_q and layout.text_q_video_keys == layout.kv_video


@functools.lru_cache(maxsize=16)
def _text_stream(device: torch.device) -> torch.cuda.Stream:
    """A second stream per device for the text queries, so their launch runs beside the
    Gluon kernel's instead of before it (it has a few dozen programs; the GPU has ~132
    multiprocessors)."""
    return torch.cuda.Stream(device=device)


def _cuda_kernel_wanted() -> bool:
    """``STA_DIST_CUDA=0`` keeps natural-order calls on the Gluon kernel."""
    return os.environ.get("STA_DIST_CUDA", "1") != "0"


def _cuda_kernel_covers(q_bshd, k_bshd, v_bshd, layout: LocalLayout, text: LocalText, facts: _LayoutFacts,
                        return_lse: bool) -> bool:
    """Whether the hand-written CUDA kernel (``kernels/sta_fwd_cuda.cu``) takes this call's
    video queries: Hopper, the whole canvas in natural order, no log-sum-exp, bf16, tiles
    (even, 8, 8), head dim 128, and the library builds (nvcc on first use). It also takes
    whole-canvas heads: on an H100 it ran the HunyuanVideo and Wan whole canvas 3-6% faster
    than SDPA's cuDNN kernel (docs/perf.md, v20)."""
    if return_lse or not facts.whole_natural or not q_bshd.is_cuda or not _cuda_kernel_wanted():
        return False
    from .kernels import sta_fwd_cuda

    return (sta_fwd_cuda.supported(q_bshd, k_bshd, v_bshd, layout.canvas, layout.tile, text.kv_for_video_q)
            and sta_fwd_cuda.available())


def _video_launch(q_bshd, k_bshd, v_bshd, layout: LocalLayout, text: LocalText, facts: _LayoutFacts, scale: float,
                  cuda_kernel: bool):
    """How this call's video queries run on Hopper, as ``launch(table, out, lse)``, or
    ``None`` (the Triton kernel then takes the whole call). With ``cuda_kernel`` (the
    caller's ``_cuda_kernel_covers``) the hand-written CUDA kernel; else what
    ``_gluon_order`` accepts goes to the Gluon kernel (also a Triton with Gluon, whole
    tiles of 128-row blocks, head dim 128, bf16/fp16)."""
    common = dict(canvas=layout.canvas, tile=layout.tile, scale=scale, text_keys=text.kv_for_video_q)
    if cuda_kernel:
        from .kernels import sta_fwd_cuda

        return lambda table, out, lse: sta_fwd_cuda.sta_fwd_cuda(q_bshd, k_bshd, v_bshd, table, out, **common)
    order = _gluon_order(facts)
    if not (order and q_bshd.is_cuda and torch.cuda.get_device_capability(q_bshd.device)[0] == 9):
        return None
    try:
        from .kernels import sta_fwd_gluon
    except ImportError:
        return None
    if not sta_fwd_gluon.supported(q_bshd, k_bshd, v_bshd, layout.canvas, layout.tile, text.kv_for_video_q, order,
                                   layout.kv_video):
        return None
    return lambda table, out, lse: sta_fwd_gluon.sta_fwd_gluon(q_bshd, k_bshd, v_bshd, table, out, order=order,
                                                               tables=facts.gluon_tables, lse=lse, **common)


def _triton_call(layout: LocalLayout, text: LocalText, facts: _LayoutFacts, scale: float, return_lse: bool) -> dict:
    """``sta_fwd``'s keyword arguments that describe the local problem."""
    return dict(
        canvas=layout.canvas, tile=layout.tile,
        q_video=layout.q_video, q_text=layout.q_text, kv_video=layout.kv_video,
        text_q_video_keys=layout.text_q_video_keys,
        q_text_valid=text.q_valid, kv_text_for_video=text.kv_for_video_q, kv_text_for_text=text.kv_for_text_q,
        scale=scale, even=facts.even, packed=facts.packed, natural=facts.natural, return_lse=return_lse,
    )


def sta_triton(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText,
               scale: float, return_lse: bool = False, config: dict | None = None, route_dense: bool = True,
               route_gluon: bool = True, keys=None):
    """Run the kernel on the local problem; same contract as :func:`sta_dist.torch_backend.sta_torch`.
    Whole-canvas heads go to SDPA (cuDNN) when no log-sum-exp is asked for, unless the CUDA
    kernel takes the call (it is faster on them too). The rest go to
    the Triton kernel, or, on Hopper where a faster kernel covers the video queries and no
    ``config`` is given (``route_gluon=False`` forbids it), to the CUDA or the Gluon kernel
    (see ``_video_launch``); the text queries then go to SDPA when they are plain dense
    attention and no log-sum-exp is asked for, else to the Triton kernel alone (a launch
    with no query tiles), on a second stream beside the video launch; the caller's stream
    waits for it before the result is returned. ``keys`` (per-query-tile key-tile lists,
    :class:`sta_dist.selection.tables.KeyTiles`) takes the Triton kernel's table path: one
    launch for every query, no routing."""
    from .kernels.sta_fwd import sta_fwd

    B, S, H, _ = q_bshd.shape
    facts = _layout_facts(layout, q_bshd.device)
    if keys is not None:
        return sta_fwd(q_bshd, k_bshd, v_bshd, facts.q_tiles, facts.kv_tiles, _head_table(heads, tuple(range(H)),
                       q_bshd.device), config=config, keys=keys, **_triton_call(layout, text, facts, scale, return_lse))
    cuda_kernel = route_gluon and not config and _cuda_kernel_covers(q_bshd, k_bshd, v_bshd, layout, text, facts,
                                                                      return_lse)
    dense = (dense_heads(layout, heads, text, facts.complete)
             if route_dense and q_bshd.is_cuda and not return_lse and not cuda_kernel else ())
    sparse = tuple(h for h in range(H) if h not in dense)
    if dense and not sparse and layout.q_video + text.q_valid == S:  # plain dense attention, no padding rows
        return _sdpa_dense(q_bshd, k_bshd, v_bshd, layout, heads, text, dense, scale, None)
    out = torch.empty(q_bshd.shape, dtype=q_bshd.dtype, device=q_bshd.device)
    if dense:
        _sdpa_dense(q_bshd, k_bshd, v_bshd, layout, heads, text, dense, scale, out)
    if not sparse:
        return out
    table = _head_table(heads, sparse, q_bshd.device)
    triton_call = dict(_triton_call(layout, text, facts, scale, return_lse), out=out)
    launch = (_video_launch(q_bshd, k_bshd, v_bshd, layout, text, facts, scale, cuda_kernel)
              if route_gluon and not config else None)
    if launch is None:
        return sta_fwd(q_bshd, k_bshd, v_bshd, facts.q_tiles, facts.kv_tiles, table, config=config, **triton_call)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q_bshd.device) if return_lse else None
    main = torch.cuda.current_stream(q_bshd.device)
    if layout.q_text:  # text query rows of out (and lse), beside the video rows' launch
        side = _text_stream(q_bshd.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            if not return_lse and _text_by_sdpa(layout, text):
                _sdpa_dense(q_bshd, k_bshd, v_bshd, layout, heads, text, sparse, scale, out, first_row=layout.q_video)
            else:
                sta_fwd(q_bshd, k_bshd, v_bshd, facts.q_tiles[:0], facts.kv_tiles, table, lse=lse, **triton_call)
    launch(table, out, lse)
    if layout.q_text:
        main.wait_stream(side)
    return (out, lse) if return_lse else out
