"""The one reference implementation of STA, and the tolerance rule every test uses.

The reference is dense masked attention. Its mask is built by brute force, token pair by
token pair, straight from the rules of docs/design.md §1 (it deliberately does not use
:mod:`sta_dist.geometry`, so that it can prove it).

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; ``_bhs`` = ``[batch, heads, seq]``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import STAConfig, WindowArg


def sta_mask(
    canvas: Sequence[int],
    tile: Sequence[int],
    window: Sequence[int],
    text_len: int,
    text_length: int,
    rows: Optional[torch.Tensor] = None,
    device=None,
) -> torch.Tensor:
    """Boolean ``[R, S]`` mask: may query ``rows[i]`` attend key ``j``? (one head).

    ``rows`` defaults to every query; ``S = T*H*W + text_len``; tokens in natural order.
    """
    T, H, W = canvas
    n_video = T * H * W
    seq = n_video + text_len
    idx = torch.arange(seq, device=device)
    q_idx = idx if rows is None else rows.to(device=device, dtype=torch.long)

    def tile_coord(i: torch.Tensor, axis: int) -> torch.Tensor:
        pos = [i // (H * W), (i // W) % H, i % W][axis]
        return pos // tile[axis]

    q_video = q_idx < n_video
    k_video = idx < n_video
    q_text_valid = (~q_video) & (q_idx - n_video < text_length)
    k_text_valid = (~k_video) & (idx - n_video < text_length)

    inside = torch.ones(len(q_idx), seq, dtype=torch.bool, device=device)
    for axis in range(3):
        n = -(-canvas[axis] // tile[axis])
        k = window[axis]
        qa = tile_coord(q_idx, axis)[:, None]
        ka = tile_coord(idx, axis)[None, :]
        start = torch.clamp(qa - (k - 1) // 2, min=0, max=max(n - k, 0))
        inside &= (start <= ka) & (ka < start + k)

    video_q = q_video[:, None] & ((inside & k_video[None, :]) | k_text_valid[None, :])
    text_q = q_text_valid[:, None] & (k_video | k_text_valid)[None, :]
    return video_q | text_q


def reference_attention(
    q_bshd: torch.Tensor,
    k_bshd: torch.Tensor,
    v_bshd: torch.Tensor,
    *,
    canvas: Sequence[int],
    tile: Sequence[int],
    window: WindowArg,
    text_length=None,
    scale: Optional[float] = None,
    rows: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
    return_lse: bool = False,
):
    """Dense masked STA in ``compute_dtype`` (default float64), natural token order.

    ``text_length`` is one int (default ``L``) or one per batch sample (a list, tuple or
    1-D tensor). Returns ``out_bshd`` of shape ``[B, R, H, D]`` in ``compute_dtype`` for
    the query ``rows`` (default all), and with ``return_lse`` also ``lse_bhs`` ``[B, H, R]``
    (natural log; ``-inf`` for rows that attend nothing, whose output is zero).
    """
    B, S, H, D = q_bshd.shape
    Hkv = k_bshd.shape[2]
    cfg = STAConfig(canvas=canvas, tile=tile, text_len=S - (canvas[0] * canvas[1] * canvas[2]))
    windows = cfg.windows(window, H)
    lengths = _per_sample(text_length, cfg.text_len, B)
    scale = D**-0.5 if scale is None else scale
    rows = torch.arange(S, device=q_bshd.device) if rows is None else rows.to(q_bshd.device)

    out = torch.zeros(B, len(rows), H, D, dtype=compute_dtype, device=q_bshd.device)
    lse = torch.full((B, H, len(rows)), float("-inf"), dtype=compute_dtype, device=q_bshd.device)
    masks: dict = {}
    for b in range(B):
        for h in range(H):
            key = (windows[h], lengths[b])
            if key not in masks:
                masks[key] = sta_mask(canvas, tile, windows[h], cfg.text_len, lengths[b], rows, q_bshd.device)
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
    return (out, lse) if return_lse else out


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
                  n_rows: int = 384, seed: int = 0) -> dict:
    """Check ``out`` on randomly sampled query rows (all rows is too much at real video
    shapes): its error against a float32 reference, against PyTorch's own error in the
    input dtype on the same rows. Always includes the first text rows and the last row."""
    g = torch.Generator().manual_seed(seed)
    S = q_bshd.shape[1]
    n_video = canvas[0] * canvas[1] * canvas[2]
    rows = torch.randint(0, n_video, (n_rows,), generator=g)
    if S > n_video:
        rows = torch.cat([rows, torch.arange(n_video, min(S, n_video + 64)), torch.tensor([S - 1])])
    kw = dict(canvas=canvas, tile=tile, window=window, text_length=text_length, rows=rows)
    ref = reference_attention(q_bshd, k_bshd, v_bshd, **kw, compute_dtype=torch.float32)
    base = reference_attention(q_bshd, k_bshd, v_bshd, **kw, compute_dtype=q_bshd.dtype)
    err, base_err = max_error(out_bshd[:, rows.to(out_bshd.device)], ref), max_error(base, ref)
    bound = error_bound(base_err, q_bshd.dtype, ref)
    return dict(error=err, torch_error=base_err, bound=bound, ok=err <= bound)
