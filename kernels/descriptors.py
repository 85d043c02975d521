"""Bulk-copy (TMA) geometry of the Triton kernel (``sta_fwd.py``), whose first rule the
route shares with the CUDA kernel (``sta_fwd_cuda.cu``): which ``[B, S, heads, D]`` tensors
the copy engine can read, and the 5-D view of a canvas in natural token order whose box is
whole t-slices of one tile. Pure functions of shapes and strides."""

from __future__ import annotations


def bulk_copy_layout_ok(*xs) -> bool:
    """Each token's heads are adjacent (head dim contiguous, heads back to back) and the
    row and batch strides are 16-byte multiples for 2-byte elements."""
    return all(x.stride(3) == 1 and x.stride(2) == x.shape[3] and x.stride(1) % 8 == 0 and x.stride(0) % 8 == 0
               for x in xs)


def natural_box(x, canvas, tile, rows: int) -> tuple[list[int], list[int], list[int]]:
    """``(shape, strides, block)`` of the 5-D view ``[B, T, H, W, heads*D]`` of ``x``'s
    canvas rows (token ``(t, h, w)`` at row ``(t*H + h)*W + w``); the block is
    ``rows // (TH*TW)`` t-slices of one tile, all heads' columns of one head wide."""
    T, H, W = canvas
    B, _, heads, D = x.shape
    s = x.stride(1)
    return ([B, T, H, W, heads * D], [x.stride(0), H * W * s, W * s, s, 1],
            [1, rows // (tile[1] * tile[2]), tile[1], tile[2], D])
