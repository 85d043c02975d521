"""Adapter from a :mod:`sta_dist.local` description to the Triton kernel launch.

Triton is imported lazily: the package works without it (the torch backend), and the
interpreter (``TRITON_INTERPRET=1``) must be chosen before triton is first imported.
"""

from __future__ import annotations

import functools
import os

import torch

from .local import LocalHeads, LocalLayout, LocalText


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


@functools.lru_cache(maxsize=64)
def _layout_tables(layout: LocalLayout, device: torch.device):
    q_tiles = torch.tensor(
        [[gid, r.base, r.stride_t, r.stride_h] for gid, r in zip(layout.q_tiles, layout.q_rows)],
        dtype=torch.int32,
    ).reshape(-1, 4)
    kv_tiles = torch.tensor(
        [[r.base, r.stride_t, r.stride_h] if r is not None else [0, 0, 0] for r in layout.kv_rows],
        dtype=torch.int32,
    ).reshape(-1, 3)
    return q_tiles.to(device), kv_tiles.to(device)


@functools.lru_cache(maxsize=256)
def _head_table(heads: LocalHeads, device: torch.device) -> torch.Tensor:
    rows = [[*w, kv] for w, kv in zip(heads.windows, heads.kv_heads)]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4).to(device)


def sta_triton(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText,
               scale: float, return_lse: bool = False, config: dict | None = None):
    """Run the kernel on the local problem; same contract as :func:`sta_dist.torch_backend.sta_torch`."""
    from .kernels.sta_fwd import sta_fwd

    q_tiles, kv_tiles = _layout_tables(layout, q_bshd.device)
    even = all(c % t == 0 for c, t in zip(layout.canvas, layout.tile))
    return sta_fwd(
        q_bshd, k_bshd, v_bshd, q_tiles, kv_tiles, _head_table(heads, q_bshd.device),
        canvas=layout.canvas, tile=layout.tile,
        q_video=layout.q_video, q_text=layout.q_text, kv_video=layout.kv_video,
        text_q_video_keys=layout.text_q_video_keys,
        q_text_valid=text.q_valid, kv_text_for_video=text.kv_for_video_q, kv_text_for_text=text.kv_for_text_q,
        scale=scale, even=even, return_lse=return_lse, config=config,
    )
