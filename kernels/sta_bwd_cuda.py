"""The hand-written Hopper backward ``kernels/sta_bwd_cuda.cu``: build, load and call.

Built and cached like the forward (``sta_fwd_cuda.build``: nvcc for sm_90a, the library
named by the hash of the source and its headers), called through ``ctypes`` with one
:class:`StaBwdArgs` (``sta_bwd_cuda_args.h``) on the caller's stream. Same arguments as
``sta_bwd.sta_bwd`` (the Triton backward), for packed tiles only
(:func:`rules.cuda_backward_reason`); the preprocess (``delta``) is the Triton one.
"""

from __future__ import annotations

import ctypes
import functools
import math
import subprocess

import torch

from . import rules
from . import sta_fwd_cuda as fwd
from .descriptors import bulk_copy_layout_ok

SOURCE = fwd.KERNELS / "sta_bwd_cuda.cu"
ARGS_HEADER = fwd.KERNELS / "sta_bwd_cuda_args.h"
_errors: list[str] = []


@functools.lru_cache(maxsize=1)
def library():
    """The loaded backward library, or ``None`` (see ``build_error``)."""
    compiler = fwd.nvcc()
    path = fwd.prebuilt(SOURCE) if compiler is None else None
    if compiler is None and path is None:
        _errors.append(fwd.missing() or "no nvcc and no library built ahead of time")
        return None
    try:
        return load(path or fwd.build(compiler, SOURCE))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        what = f"loading {path}" if path else f"building {SOURCE.name} with {compiler}"
        _errors.append(f"{what} failed: {detail.strip()[-2000:]}")
        return None


def build_error() -> str | None:
    return _errors[-1] if _errors else None


class StaBwdArgs(ctypes.Structure):
    """``StaBwdArgs`` of ``sta_bwd_cuda_args.h``, field for field (checked against the
    header by ``tests/test_cuda_build.py``, against the library's size by :func:`load`)."""

    P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
    _fields_ = [
        ("q", P), ("k", P), ("v", P), ("dout", P), ("dq", P), ("dk", P), ("dv", P), ("lse2", P), ("delta", P),
        ("s_pad", L), ("heads", P), ("n_heads", I), ("q_tiles", P), ("n_q_tiles", I), ("q_slot", P),
        ("kv_tiles", P), ("kv_list", P), ("n_kv", I), ("groups", P), ("g_stride", I),
        ("f16", I), ("B", I), ("T", I), ("H", I), ("W", I), ("TT", I), ("TH", I), ("TW", I),
        ("q_heads", I), ("kv_heads", I), ("s_q", L), ("s_kv", L),
        ("sq_b", L), ("sq_s", L), ("sk_b", L), ("sk_s", L), ("sv_b", L), ("sv_s", L), ("sdo_b", L), ("sdo_s", L),
        ("sdq_b", L), ("sdq_s", L), ("sdk_b", L), ("sdk_s", L),
        ("q_video", I), ("q_text_valid", I), ("kv_video", I), ("kv_text_for_video", I), ("kv_text_for_text", I),
        ("text_q_video_keys", I),
        ("sel_keys", P), ("sel_counts", P), ("sel_strides", L * 5), ("t_keys", P), ("t_counts", P),
        ("t_strides", L * 5), ("clip", I * 6), ("scale", F), ("sm_scale", F), ("stream", P),
    ]
    del P, I, L, F


def load(path):
    lib = ctypes.CDLL(str(path))
    try:
        lib.sta_bwd_cuda_launch.argtypes = [ctypes.POINTER(StaBwdArgs)]
        lib.sta_bwd_cuda_args_size.argtypes = []
        lib.sta_bwd_cuda_schedule.argtypes = [ctypes.POINTER(StaBwdArgs), ctypes.c_int, ctypes.c_longlong,
                                              ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    except AttributeError as err:
        raise OSError(f"{path} has no sta_bwd_cuda_launch(const StaBwdArgs*): {err}") from None
    lib.sta_bwd_cuda_launch.restype = lib.sta_bwd_cuda_args_size.restype = ctypes.c_int
    lib.sta_bwd_cuda_schedule.restype = ctypes.c_longlong
    size = lib.sta_bwd_cuda_args_size()
    if size != ctypes.sizeof(StaBwdArgs):
        raise OSError(f"{path}: sizeof(StaBwdArgs) is {size} there, {ctypes.sizeof(StaBwdArgs)} here")
    return lib


def _tables(keys):
    """A table pair's pointers and its strides as the struct holds them (``sta_bwd.table_strides``)."""
    from .sta_bwd import table_strides

    k, c, *strides = table_strides(keys)
    return (None if k is None else k.data_ptr(), None if c is None else c.data_ptr(),
            (ctypes.c_longlong * 5)(*strides))


def row_stats(lse_bhs, delta_bhs, q_video: int, q_text_valid: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The kernel's per-row statistics, ``[B, H, s_pad]`` float32 with ``s_pad`` the rows
    padded by 128 (a multiple of 4): ``lse2`` the log-sum-exp in log2 units, ``+inf`` where
    a row counts nothing (attends nothing, a text row past the valid ones, the padding), and
    ``delta``."""
    B, H, S = lse_bhs.shape
    s_pad = -(-(S + 128) // 4) * 4
    lse2 = torch.full((B, H, s_pad), math.inf, dtype=torch.float32, device=lse_bhs.device)
    lse2[..., :S] = torch.where(lse_bhs > -math.inf, lse_bhs.float() * fwd.LOG2E, math.inf)
    lse2[..., q_video + q_text_valid:] = math.inf
    delta = torch.zeros((B, H, s_pad), dtype=torch.float32, device=lse_bhs.device)
    delta[..., :S] = delta_bhs
    return lse2, delta, s_pad


def launch_args(q, k, v, dout, dq, dk, dv, lse2, delta, s_pad, q_tiles, q_slot, kv_tiles, kv_list, heads, groups, *,
                canvas, tile, q_video, kv_video, text_q_video_keys, q_text_valid, kv_text_for_video,
                kv_text_for_text, scale, keys=None, t_keys=None, clip=None, stream=None) -> StaBwdArgs:
    """The :class:`StaBwdArgs` of one backward (tensors as :func:`sta_bwd_cuda` takes them;
    ``dq``, ``dk``, ``dv`` the outputs; ``lse2``, ``delta``, ``s_pad`` from
    :func:`row_stats`); for :func:`schedule` the tables may lie in host memory."""
    grid = tuple(c // t for c, t in zip(canvas, tile))
    lo, hi = clip if clip is not None else ((0, 0, 0), grid)
    sel_keys, sel_counts, sel_strides = _tables(keys)
    t_k, t_c, t_strides = _tables(t_keys)
    T, Hc, W = canvas
    ptr = lambda x: None if x is None else x.data_ptr()  # noqa: E731
    return StaBwdArgs(
        q=ptr(q), k=ptr(k), v=ptr(v), dout=ptr(dout), dq=ptr(dq), dk=ptr(dk), dv=ptr(dv), lse2=ptr(lse2),
        delta=ptr(delta), s_pad=s_pad, heads=heads.data_ptr(), n_heads=heads.shape[0], q_tiles=q_tiles.data_ptr(),
        n_q_tiles=q_tiles.shape[0], q_slot=q_slot.data_ptr(), kv_tiles=kv_tiles.data_ptr(),
        kv_list=kv_list.data_ptr(), n_kv=kv_list.shape[0], groups=groups.data_ptr(), g_stride=groups.stride(0),
        f16=int(q.dtype == torch.float16), B=q.shape[0], T=T, H=Hc, W=W, TT=tile[0], TH=tile[1], TW=tile[2],
        q_heads=q.shape[2], kv_heads=k.shape[2], s_q=q.shape[1], s_kv=min(k.shape[1], v.shape[1]),
        sq_b=q.stride(0), sq_s=q.stride(1), sk_b=k.stride(0), sk_s=k.stride(1), sv_b=v.stride(0), sv_s=v.stride(1),
        sdo_b=dout.stride(0), sdo_s=dout.stride(1), sdq_b=dq.stride(0), sdq_s=dq.stride(1), sdk_b=dk.stride(0),
        sdk_s=dk.stride(1), q_video=q_video, q_text_valid=q_text_valid, kv_video=kv_video,
        kv_text_for_video=kv_text_for_video, kv_text_for_text=kv_text_for_text, text_q_video_keys=text_q_video_keys,
        sel_keys=sel_keys, sel_counts=sel_counts, sel_strides=sel_strides, t_keys=t_k, t_counts=t_c,
        t_strides=t_strides, clip=(ctypes.c_int * 6)(*lo, *hi), scale=scale * fwd.LOG2E, sm_scale=scale,
        stream=stream)


PROGRAM_FIELDS = ("text", "b", "head", "x_row", "x_head", "valid", "rows_video", "rows_text")
"""What :func:`schedule` says of a program before its blocks (``head``: dq, a row of the head
table; dk/dv, a kv head)."""


def schedule(args: StaBwdArgs, dkdv: bool) -> list[tuple[dict, list[tuple[int, int, int, int]]]]:
    """Every program of the dq (``dkdv=False``) or dk/dv kernel as the kernel's own block
    schedule gives it, run on the host (``args``' tables in host memory): per program its
    :data:`PROGRAM_FIELDS` and its streamed blocks ``(first row, head, columns that count,
    resident rows that count)``."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"sta_bwd_cuda: kernel library unavailable: {build_error()}")
    n = lib.sta_bwd_cuda_schedule(ctypes.byref(args), int(dkdv), -1, None, 0)
    out, cap = [], 1 << 16
    buf = (ctypes.c_int * cap)()
    for pid in range(n):
        size = lib.sta_bwd_cuda_schedule(ctypes.byref(args), int(dkdv), pid, buf, cap)
        if size > cap:
            cap = size
            buf = (ctypes.c_int * cap)()
            size = lib.sta_bwd_cuda_schedule(ctypes.byref(args), int(dkdv), pid, buf, cap)
        values = list(buf[:size])
        blocks = [tuple(values[i:i + 4]) for i in range(8, size, 4)]
        out.append((dict(zip(PROGRAM_FIELDS, values[:8])), blocks))
    return out


def sta_bwd_cuda(q_bshd, k_bshd, v_bshd, out_bshd, dout_bshd, lse_bhs, dlse_bhs, q_tiles, q_slot, kv_tiles, kv_list,
                 heads, groups, *, canvas, tile, q_video, kv_video, text_q_video_keys, q_text_valid,
                 kv_text_for_video, kv_text_for_text, scale, even, rows_aligned, keys=None, t_keys=None, clip=None):
    """``sta_bwd.sta_bwd`` on the Hopper kernels: ``(dq, dk, dv)``; ``rows_aligned``: every
    query tile's first row (``q_tiles[:, 1]``) is a multiple of 4 (the statistics' bulk
    copies are 16-byte aligned). Raises where :func:`rules.cuda_backward_reason` refuses the
    call or the library is missing."""
    from .sta_bwd import preprocess

    reason = rules.cuda_backward_reason(
        dtype=str(q_bshd.dtype).removeprefix("torch."), head_dim=q_bshd.shape[3], canvas=tuple(canvas),
        tile=tuple(tile), packed=True, even=even, rows_aligned=rows_aligned and q_video % 4 == 0,
        bulk_copy=bulk_copy_layout_ok(q_bshd, k_bshd, v_bshd) and bulk_copy_layout_ok(dout_bshd, k_bshd, v_bshd))
    if reason:
        raise ValueError(f"sta_bwd_cuda: unsupported call: the kernel {reason}")
    lib = library()
    if lib is None:
        raise RuntimeError(f"sta_bwd_cuda: kernel library unavailable: {build_error()}")
    B, H = q_bshd.shape[0], q_bshd.shape[2]
    delta = preprocess(out_bshd, dout_bshd, dlse_bhs)
    lse2, delta, s_pad = row_stats(lse_bhs, delta, q_video, q_text_valid)
    dq, dk, dv = torch.zeros_like(q_bshd), torch.zeros_like(k_bshd), torch.zeros_like(v_bshd)
    if dk.stride() != dv.stride():
        raise ValueError("sta_bwd_cuda: dk and dv must have equal strides")
    args = launch_args(q_bshd, k_bshd, v_bshd, dout_bshd, dq, dk, dv, lse2, delta, s_pad, q_tiles, q_slot, kv_tiles,
                       kv_list, heads, groups, canvas=canvas, tile=tile, q_video=q_video, kv_video=kv_video,
                       text_q_video_keys=text_q_video_keys, q_text_valid=q_text_valid,
                       kv_text_for_video=kv_text_for_video, kv_text_for_text=kv_text_for_text, scale=scale,
                       keys=keys, t_keys=t_keys, clip=clip,
                       stream=torch.cuda.current_stream(q_bshd.device).cuda_stream)
    if B and H:
        rc = lib.sta_bwd_cuda_launch(ctypes.byref(args))
        if rc:
            raise RuntimeError(f"sta_bwd_cuda: launch failed with code {rc} (1: no tensor-map encoder; 100+: "
                               f"CUresult of a tensor map; 1000+: cudaError_t)")
    return dq, dk, dv


if __name__ == "__main__":  # build ahead of time (no GPU needed): python -m sta_dist.kernels.sta_bwd_cuda
    import sys

    compiler = fwd.nvcc()
    if compiler is None:
        sys.exit(fwd.missing())
    try:
        print(fwd.build(compiler, SOURCE))
    except subprocess.CalledProcessError as err:
        sys.exit(f"building {SOURCE.name} with {compiler} failed: {err.stderr.strip()[-2000:]}")
