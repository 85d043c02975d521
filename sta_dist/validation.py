"""Checks of user inputs. Each error names the argument, the rule and the value."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .config import STAConfig, WindowArg
from .geometry import Triple

SUPPORTED_HEAD_DIMS = tuple(range(32, 257, 32))
"""FastVideo's list, 32 to 256 in steps of 32."""
KERNEL_HEAD_DIMS = (32, 64, 96, 128, 256)
"""Head dims the GPU kernels are built and tested for; the others are zero-padded to the
next of these (:func:`kernel_head_dim`)."""
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Shapes ``q [B, S, H, D]``, ``k, v [B, S, Hkv, D]`` with ``H % Hkv == 0``, one dtype
    and one device. Returns ``(B, S, H, Hkv, D)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, S, H, D], got {name}.dim()={x.dim()} (shape {tuple(x.shape)})")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    B, S, H, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, S, D):
        raise ValueError(
            f"k/v must be [B, S, Hkv, D] with q's B, S and D, got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
        )
    Hkv = k.shape[2]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"query heads must be a multiple of kv heads (H % Hkv == 0), got H={H}, Hkv={Hkv}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32, got q.dtype={q.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got q.device={q.device}, k.device={k.device}, v.device={v.device}")
    check_head_dim(D)
    return B, S, H, Hkv, D


def check_head_dim(head_dim: int) -> int:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS}, got head_dim={head_dim}")
    return head_dim


def kernel_head_dim(head_dim: int) -> int:
    """The kernel head dim that ``head_dim`` runs at: itself, or the next larger one."""
    return next(d for d in KERNEL_HEAD_DIMS if d >= head_dim)


def check_seq_len(seq_len: int, cfg: STAConfig, name: str = "q.shape[1]") -> None:
    if seq_len != cfg.seq_len:
        raise ValueError(
            f"{name} must equal T*H*W + text_len = {cfg.num_video} + {cfg.text_len} = {cfg.seq_len} "
            f"for canvas={cfg.canvas}, got {name}={seq_len}"
        )


def infer_config(seq_len: int, canvas, tile) -> STAConfig:
    """The config of a sequence of ``seq_len`` tokens: the canvas, then text."""
    probe = STAConfig(canvas=canvas, tile=tile)
    if seq_len < probe.num_video:
        raise ValueError(
            f"sequence length S must be T*H*W + L with L >= 0: canvas={probe.canvas} has "
            f"{probe.num_video} video tokens, got S={seq_len}"
        )
    return STAConfig(canvas=probe.canvas, tile=probe.tile, text_len=seq_len - probe.num_video)


TextLength = Union[int, tuple[int, ...]]
"""Valid text tokens: one count for every batch sample, or one per sample."""


def _one_text_length(value, text_len: int, name: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int in [0, L] = [0, {text_len}], got {name}={value!r} "
                        f"({type(value).__name__})")
    value = int(value)
    if not 0 <= value <= text_len:
        raise ValueError(f"{name} must be an int in [0, L] = [0, {text_len}], got {name}={value!r}")
    return value


def check_text_length(text_length, text_len: int, batch: Optional[int] = None) -> TextLength:
    """``text_length``: ``None`` (every text token), one int for every sample, or one per
    batch sample (a list or tuple, or a 1-D integer tensor, which is read to the host
    once per call), each in ``[0, L]``; with ``batch`` given, a per-sample value must have
    ``batch`` entries.

    Returns one int when every sample has the same count (the fast path: one launch),
    else a tuple of one int per sample.
    """
    if text_length is None:
        return text_len
    if isinstance(text_length, torch.Tensor):
        if text_length.is_floating_point() or text_length.is_complex() or text_length.dtype == torch.bool:
            raise TypeError(f"text_length must hold integers, got a tensor of dtype={text_length.dtype}")
        if text_length.dim() > 1:
            raise ValueError(f"text_length must be one int or one per batch sample (a 1-D tensor), got a "
                             f"tensor of shape {tuple(text_length.shape)}")
        text_length = text_length.item() if text_length.dim() == 0 else text_length.tolist()
    if not isinstance(text_length, (list, tuple)):
        return _one_text_length(text_length, text_len, "text_length")
    if not text_length or (batch is not None and len(text_length) != batch):
        expected = f"B={batch}" if batch is not None else "at least one"
        raise ValueError(f"text_length must be one int or one per batch sample: expected {expected} values, "
                         f"got len(text_length)={len(text_length)}")
    lengths = tuple(_one_text_length(v, text_len, f"text_length[{i}]") for i, v in enumerate(text_length))
    return lengths[0] if len(set(lengths)) == 1 else lengths


def check_scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite float > 0, got scale={scale!r}")
    return float(scale)


def check_causal(causal: bool) -> None:
    """Sliding tile attention has no causal form: ``causal`` must be false."""
    if causal:
        raise ValueError(f"causal must be False: sliding tile attention is bidirectional within its 3-D window, "
                         f"got causal={causal!r}")


def check_layout(layout: str) -> str:
    if layout not in ("natural", "tiled"):
        raise ValueError(f"layout must be 'natural' or 'tiled', got layout={layout!r}")
    return layout


def check_call(q, k, v, canvas, tile, window: WindowArg, text_length, scale):
    """Everything :func:`sta_dist.sliding_tile_attention` needs to trust its inputs.

    Returns ``(cfg, windows, text_length, scale, num_kv_heads)``; ``text_length`` as
    :func:`check_text_length` gives it.
    """
    B, S, H, Hkv, D = check_qkv(q, k, v)
    cfg = infer_config(S, canvas, tile)
    windows: tuple[Triple, ...] = cfg.windows(window, H)
    return cfg, windows, check_text_length(text_length, cfg.text_len, B), check_scale(scale, D), Hkv
