"""The one reference implementation of STA, and the tolerance rule every test uses.

The reference is dense masked attention. Its mask is built by brute force, token pair by
token pair, straight from the rules of docs/design.md §1 (it deliberately does not use
:mod:`sta_dist.geometry`, so that it can prove it).

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; ``_bhs`` = ``[batch, heads, seq]``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .config import STAConfig, WindowArg


def _axis_inside(qa: torch.Tensor, ka: torch.Tensor, k: int, n: int, rule: str) -> torch.Tensor:
    """Is key tile coordinate ``ka`` inside query tile ``qa``'s window on one axis, written
    from each rule's own definition (docs/design.md §1), not from the geometry code."""
    if rule == "sta":
        start = torch.clamp(qa - (k - 1) // 2, min=0, max=max(n - k, 0))
        return (start <= ka) & (ka < start + k)
    if rule == "fastvideo":  # FastVideo's mask: a centre clamped to [k//2, n-1-k//2] (max wins), half-width k//2
        centre = torch.minimum(torch.maximum(qa, torch.full_like(qa, k // 2)), torch.full_like(qa, n - 1 - k // 2))
        return (centre - ka).abs() <= k // 2
    if rule == "clipped":  # NABLA's prior: within k//2 of the query tile
        return (qa - ka).abs() <= k // 2
    raise ValueError(f"unknown window_rule={rule!r}")


def _token_tiles(canvas: Sequence[int], tile: Sequence[int], idx: torch.Tensor) -> torch.Tensor:
    """``[len(idx), 3]`` tile coordinates of natural-order video token indices."""
    T, H, W = canvas
    pos = torch.stack([idx // (H * W), (idx // W) % H, idx % W], 1)
    return pos // torch.tensor(list(tile), device=idx.device)


def sta_mask(
    canvas: Sequence[int],
    tile: Sequence[int],
    window: Optional[Sequence[int]],
    text_len: int,
    text_length: int,
    rows: Optional[torch.Tensor] = None,
    device=None,
    window_rule: str = "sta",
    tiles: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean ``[R, S]`` mask: may query ``rows[i]`` attend key ``j``? (one head).

    ``rows`` defaults to every query; ``S = T*H*W + text_len``; tokens in natural order.
    ``window=None``: no window; ``tiles`` (``[n_tiles, n_tiles]`` bool, tile ids row-major)
    adds the key tiles each query tile selected.
    """
    T, H, W = canvas
    n_video = T * H * W
    seq = n_video + text_len
    idx = torch.arange(seq, device=device)
    q_idx = idx if rows is None else rows.to(device=device, dtype=torch.long)
    grid = [-(-c // t) for c, t in zip(canvas, tile)]

    q_video = q_idx < n_video
    k_video = idx < n_video
    q_text_valid = (~q_video) & (q_idx - n_video < text_length)
    k_text_valid = (~k_video) & (idx - n_video < text_length)

    q_tile = _token_tiles(canvas, tile, q_idx.clamp(max=n_video - 1))
    k_tile = _token_tiles(canvas, tile, idx.clamp(max=n_video - 1))
    inside = torch.zeros(len(q_idx), seq, dtype=torch.bool, device=device)
    if window is not None:
        inside |= True
        for axis in range(3):
            inside &= _axis_inside(q_tile[:, None, axis], k_tile[None, :, axis], window[axis], grid[axis], window_rule)
    if tiles is not None:
        q_id = (q_tile[:, 0] * grid[1] + q_tile[:, 1]) * grid[2] + q_tile[:, 2]
        k_id = (k_tile[:, 0] * grid[1] + k_tile[:, 1]) * grid[2] + k_tile[:, 2]
        inside |= tiles.to(device)[q_id][:, k_id]

    video_q = q_video[:, None] & ((inside & k_video[None, :]) | k_text_valid[None, :])
    text_q = q_text_valid[:, None] & (k_video | k_text_valid)[None, :]
    return video_q | text_q


def reference_tile_means(x_bshd: torch.Tensor, canvas: Sequence[int], tile: Sequence[int],
                         share_heads: bool) -> torch.Tensor:
    """``[B, H or 1, n_tiles, D]`` float32: per batch sample, head and tile, the mean of
    ``x``'s video tokens in the tile (partial tiles: their tokens only), each token's tile
    found from its coordinates. The sum is taken in float64 (exact for any realistic
    input, so its order does not matter) and rounded once to float32; ``share_heads``
    sums over the heads too and divides by tokens x heads."""
    B, _, H, D = x_bshd.shape
    n_video = canvas[0] * canvas[1] * canvas[2]
    grid = [-(-c // t) for c, t in zip(canvas, tile)]
    n = grid[0] * grid[1] * grid[2]
    coords = _token_tiles(canvas, tile, torch.arange(n_video, device=x_bshd.device))
    ids = (coords[:, 0] * grid[1] + coords[:, 1]) * grid[2] + coords[:, 2]
    count = torch.bincount(ids, minlength=n).double()
    heads = 1 if share_heads else H
    out = torch.empty(B, heads, n, D, dtype=torch.float32, device=x_bshd.device)
    for b in range(B):
        sums = torch.zeros(H, n, D, dtype=torch.float64, device=x_bshd.device)
        for h in range(H):
            sums[h].index_add_(0, ids, x_bshd[b, :n_video, h].double())
        if share_heads:
            out[b, 0] = (sums.sum(0) / (count[:, None] * H)).float()
        else:
            out[b] = (sums / count[None, :, None]).float()
    return out


def _beats(s: torch.Tensor) -> torch.Tensor:
    """``[..., j', j]``: does key tile ``j'`` rank above ``j`` (a higher score, or an equal
    score and a lower index)?"""
    n = s.shape[-1]
    idx = torch.arange(n, device=s.device)
    higher = s[..., :, None] > s[..., None, :]
    tie_lower = (s[..., :, None] == s[..., None, :]) & (idx[:, None] < idx[None, :])
    return higher | tie_lower


def reference_selection(q_bshd: torch.Tensor, k_bshd: torch.Tensor, canvas: Sequence[int], tile: Sequence[int],
                        select) -> torch.Tensor:
    """``[B, H or 1, n_tiles, n_tiles]`` bool: the key tiles each query tile selects under
    ``select`` (:class:`sta_dist.TopK`, :class:`sta_dist.Mass` or a mask, returned as is),
    by brute force: a tile's rank is the number of tiles that beat it."""
    if isinstance(select, torch.Tensor):
        return select.to(q_bshd.device)
    H, Hkv, D = q_bshd.shape[2], k_bshd.shape[2], q_bshd.shape[3]
    qbar = reference_tile_means(q_bshd, canvas, tile, select.share_heads)
    kbar = reference_tile_means(k_bshd, canvas, tile, select.share_heads)
    if not select.share_heads:
        kbar = kbar[:, [h // (H // Hkv) for h in range(H)]]
    out = torch.empty(qbar.shape[:3] + (kbar.shape[2],), dtype=torch.bool, device=q_bshd.device)
    for b in range(qbar.shape[0]):
        for h in range(qbar.shape[1]):
            for lo in range(0, qbar.shape[2], 64):  # [rows, n, n] per chunk
                s = qbar[b, h, lo:lo + 64].double() @ kbar[b, h].double().T
                beats = _beats(s)
                if hasattr(select, "k"):
                    out[b, h, lo:lo + 64] = beats.sum(-2) < select.k
                else:
                    p = torch.softmax(s / math.sqrt(D), -1)
                    at_or_below = (p[:, :, None] * ~beats).sum(-2)  # P of j and every tile ranked below it
                    out[b, h, lo:lo + 64] = at_or_below >= 1 - select.p
    return out


def reference_attention(
    q_bshd: torch.Tensor,
    k_bshd: torch.Tensor,
    v_bshd: torch.Tensor,
    *,
    canvas: Sequence[int],
    tile: Sequence[int],
    window: Optional[WindowArg],
    text_length=None,
    scale: Optional[float] = None,
    rows: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
    return_lse: bool = False,
    select=None,
    window_rule: str = "sta",
    return_selection: bool = False,
):
    """Dense masked STA in ``compute_dtype`` (default float64), natural token order.

    ``text_length`` is one int (default ``L``) or one per batch sample (a list, tuple or
    1-D tensor). ``select`` (:class:`sta_dist.TopK`, :class:`sta_dist.Mass` or a bool tile
    mask ``[B, H or 1, n, n]``) adds selected key tiles to each query tile's window under
    ``window_rule``; ``window=None`` is the selection alone. Returns ``out_bshd`` of shape
    ``[B, R, H, D]`` in ``compute_dtype`` for the query ``rows`` (default all), with
    ``return_lse`` also ``lse_bhs`` ``[B, H, R]`` (natural log; ``-inf`` for rows that
    attend nothing, whose output is zero), and with ``return_selection`` also the key
    tiles each query tile attends, ``[B, 1 or H, n, n]`` bool (see :func:`attended_tiles`).
    """
    B, S, H, D = q_bshd.shape
    Hkv = k_bshd.shape[2]
    cfg = STAConfig(canvas=canvas, tile=tile, text_len=S - (canvas[0] * canvas[1] * canvas[2]))
    windows = [None] * H if window is None else cfg.windows(window, H)
    lengths = _per_sample(text_length, cfg.text_len, B)
    scale = D**-0.5 if scale is None else scale
    rows = torch.arange(S, device=q_bshd.device) if rows is None else rows.to(q_bshd.device)
    selected = None if select is None else reference_selection(q_bshd, k_bshd, canvas, tile, select)

    out = torch.zeros(B, len(rows), H, D, dtype=compute_dtype, device=q_bshd.device)
    lse = torch.full((B, H, len(rows)), float("-inf"), dtype=compute_dtype, device=q_bshd.device)
    masks: dict = {}
    for b in range(B):
        for h in range(H):
            if selected is None:
                key, tiles = (windows[h], lengths[b]), None
            else:
                hs = h if selected.shape[1] > 1 else 0
                key, tiles = (windows[h], lengths[b], b, hs), selected[b, hs]
            if key not in masks:
                masks[key] = sta_mask(canvas, tile, windows[h], cfg.text_len, lengths[b], rows, q_bshd.device,
                                      window_rule, tiles)
            mask = masks[key]
            kvh = h // (H // Hkv)
            q = q_bshd[b, rows, h].to(compute_dtype)
            k = k_bshd[b, :, kvh].to(compute_dtype)
            v = v_bshd[b, :, kvh].to(compute_dtype)
            # Low precision as flash-attention's attention_ref: products in the dtype,
            # softmax in float32, probabilities rounded back to the dtype.
            soft_dtype = compute_dtype if compute_dtype in (torch.float32, torch.float64) else torch.float32
            scores = ((q @ k.transpose(0, 1)) * scale).to(soft_dtype)
            scores = scores.masked_fill(~mask, float("-inf"))
            has_keys = mask.any(-1)
            probs = torch.softmax(scores, -1).nan_to_num(0.0).to(compute_dtype)
            out[b, :, h] = (probs @ v) * has_keys[:, None]
            lse[b, h] = torch.where(has_keys, torch.logsumexp(scores, -1), float("-inf")).to(compute_dtype)
    result = (out, lse) if return_lse else (out,)
    if return_selection:
        result += (attended_tiles(canvas, tile, None if window is None else windows, window_rule, selected, B),)
    return result if len(result) > 1 else result[0]


def attended_tiles(canvas: Sequence[int], tile: Sequence[int], windows: Optional[Sequence], window_rule: str,
                   selected: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    """``[B, 1 or H, n, n]`` bool: the key tiles each query tile attends, the window's (one
    per head, or ``None``) united with ``selected`` (``[B, 1 or H, n, n]`` or ``None``).
    One head when the selection is shared (or absent) and every head has the same window."""
    grid = [-(-c // t) for c, t in zip(canvas, tile)]
    n = grid[0] * grid[1] * grid[2]
    device = selected.device if selected is not None else None
    ids = torch.arange(n, device=device)
    c = torch.stack([ids // (grid[1] * grid[2]), (ids // grid[2]) % grid[1], ids % grid[2]], 1)

    def window_tiles(window) -> torch.Tensor:
        if window is None:
            return torch.zeros(n, n, dtype=torch.bool, device=device)
        inside = torch.ones(n, n, dtype=torch.bool, device=device)
        for a in range(3):
            inside &= _axis_inside(c[:, None, a], c[None, :, a], window[a], grid[a], window_rule)
        return inside

    distinct = [None] if windows is None else list(dict.fromkeys(tuple(w) for w in windows))
    one_head = len(distinct) == 1 and (selected is None or selected.shape[1] == 1)
    if one_head:
        win = window_tiles(distinct[0])[None, None].expand(batch, 1, n, n)
    else:
        per = {w: window_tiles(w) for w in distinct}
        win = torch.stack([per[None if windows is None else tuple(w)] for w in (windows or [None])], 0)
        win = win[None].expand(batch, -1, n, n)
    return win | selected if selected is not None else win.clone()


def _per_sample(text_length, text_len: int, batch: int) -> list[int]:
    """One valid-text count per batch sample (no validation: the reference trusts its caller)."""
    if text_length is None:
        return [text_len] * batch
    if isinstance(text_length, torch.Tensor):
        text_length = text_length.tolist()
    if isinstance(text_length, (list, tuple)):
        return [int(n) for n in text_length]
    return [int(text_length)] * batch


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64; NaN anywhere gives inf."""
    diff = (out.double() - ref.double()).abs()
    if torch.isnan(diff).any():
        return float("inf")
    return diff.max().item() if diff.numel() else 0.0


def error_bound(baseline_error: float, dtype: torch.dtype, ref: torch.Tensor) -> float:
    """What a backend's error against the float64 reference may be: at most twice
    PyTorch's own error in the same dtype (flash-attention's rule), plus one ulp of the
    dtype at the output's largest magnitude, so that a lucky exact baseline does not
    demand a bit-exact result."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return 2.0 * baseline_error + torch.finfo(dtype).eps * scale


def sampled_check(q_bshd, k_bshd, v_bshd, out_bshd, *, canvas, tile, window, text_length=None,
                  n_rows: int = 384, seed: int = 0, select=None, window_rule: str = "sta",
                  selection: Optional[torch.Tensor] = None) -> dict:
    """Check ``out`` on randomly sampled query rows (all rows is too much at real video
    shapes): its error against a float32 reference, against PyTorch's own error in the
    input dtype on the same rows. Always includes the first text rows and the last row.
    With ``select``, ``selection`` (the tiles the call returned with ``return_selection``)
    must equal the reference's, tile for tile."""
    g = torch.Generator().manual_seed(seed)
    S = q_bshd.shape[1]
    n_video = canvas[0] * canvas[1] * canvas[2]
    rows = torch.randint(0, n_video, (n_rows,), generator=g)
    if S > n_video:
        rows = torch.cat([rows, torch.arange(n_video, min(S, n_video + 64)), torch.tensor([S - 1])])
    kw = dict(canvas=canvas, tile=tile, window=window, text_length=text_length, rows=rows, select=select,
              window_rule=window_rule)
    ref, tiles = reference_attention(q_bshd, k_bshd, v_bshd, **kw, compute_dtype=torch.float32, return_selection=True)
    base = reference_attention(q_bshd, k_bshd, v_bshd, **kw, compute_dtype=q_bshd.dtype)
    err, base_err = max_error(out_bshd[:, rows.to(out_bshd.device)], ref), max_error(base, ref)
    bound = error_bound(base_err, q_bshd.dtype, ref)
    result = dict(error=err, torch_error=base_err, bound=bound, ok=err <= bound)
    if selection is not None:
        same = selection.shape == tiles.shape and torch.equal(selection.to(tiles.device), tiles)
        result.update(selection_equal=same, attended_tiles=tiles.float().mean().item(), ok=result["ok"] and same)
    return result
