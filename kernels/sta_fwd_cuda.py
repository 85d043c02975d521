"""The hand-written Hopper kernel ``kernels/sta_fwd_cuda.cu``: build, load and call.

The source (with the headers it includes from ``kernels/``: ``hopper/*.cuh``,
``sta_fwd_cuda_args.h``) is compiled with ``nvcc`` for sm_90a in one invocation the first
time it is needed (seconds to tens of seconds; no GPU needed) into a shared library in the
cache directory (``$STA_DIST_CACHE`` or ``~/.cache/sta_dist``), named by the hash of the
source, its headers and the flags and of the compiler's version, so the next process loads
it at once. ``nvcc`` is ``$STA_DIST_NVCC``, else the one on the ``PATH``, else
``$CUDA_HOME/bin/nvcc``. Without a compiler, a library built ahead of time
for this source is loaded from the cache (``python -m sta_dist.kernels.sta_fwd_cuda`` builds
one where ``nvcc`` is, e.g. on a login node into a shared ``$STA_DIST_CACHE``). With
neither, or if the build fails, ``library()`` is ``None`` (``build_error()`` says why) and
the route takes the Triton kernel. The call goes through ``ctypes`` on the caller's CUDA
stream: one :class:`StaFwdArgs` by pointer, the struct of ``sta_fwd_cuda_args.h``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from . import rules
from .descriptors import bulk_copy_layout_ok

LOG2E = 1.4426950408889634
KERNELS = Path(__file__).parent
"""The folder of the kernel sources: nvcc's ``-I``, so a source elsewhere (another
commit's ``sta_fwd_cuda.cu``) takes the headers it lacks beside it from here."""
SOURCE = KERNELS / "sta_fwd_cuda.cu"
ARGS_HEADER = KERNELS / "sta_fwd_cuda_args.h"
# --split-compile=0: the kernel's eight instantiations (fp16/bf16 x resumed or not x 128- or
# 192-row key blocks) optimized and assembled in parallel, one job per CPU.
NVCC_FLAGS = ("-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler", "-fPIC",
              "--split-compile=0")
_errors: list[str] = []


def nvcc() -> str | None:
    """The CUDA compiler to build with, or ``None``."""
    for candidate in (os.environ.get("STA_DIST_NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("STA_DIST_CACHE", Path.home() / ".cache" / "sta_dist")) / "cuda"


def headers(source: Path = SOURCE) -> list[tuple[str, Path]]:
    """The ``#include "..."`` files that compiling ``source`` reads, as ``(name as
    written, path)``, each once, in the order the preprocessor meets them: found as nvcc
    finds them, beside the including file first, then in :data:`KERNELS` (``-I``); a name
    found in neither is left to nvcc to report."""
    found: list[tuple[str, Path]] = []

    def walk(path: Path) -> None:
        for line in path.read_text().splitlines():
            m = re.match(r'\s*#\s*include\s*"([^"]+)"', line)
            if not m:
                continue
            name = m.group(1)
            header = next((d / name for d in (path.parent, KERNELS) if (d / name).is_file()), None)
            if header is not None and all(header.resolve() != seen.resolve() for _, seen in found):
                found.append((name, header))
                walk(header)

    walk(Path(source))
    return found


def source_key(source: Path = SOURCE) -> str:
    """The hash of the source, the headers it includes (name and text) and the build
    flags: the first part of a library's name, so a changed header builds anew."""
    h = hashlib.sha256(Path(source).read_bytes())
    for name, path in headers(source):
        h.update(b"\0" + name.encode() + b"\0" + path.read_bytes())
    h.update(" ".join(NVCC_FLAGS).encode())
    return h.hexdigest()[:16]


def nvcc_command(compiler: str, source: Path, output: str) -> list[str]:
    """The one nvcc invocation that builds ``source`` into the library ``output``."""
    return [compiler, *NVCC_FLAGS, "-I", str(KERNELS), "-o", output, str(source)]


def prebuilt(source: Path = SOURCE) -> Path | None:
    """A library for this source in the cache, built by any compiler (newest first)."""
    found = sorted(cache_dir().glob(f"{Path(source).stem}_{source_key(source)}_*.so"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def build(compiler: str, source: Path = SOURCE) -> Path:
    """The shared library for this source (another one: the backward's
    ``sta_bwd_cuda.cu``, or an experiment's, e.g. an older commit's kernel beside this one)
    and compiler, named by the source's stem, compiled if the cache lacks it (written to
    a temporary name first, so concurrent builds never load a partial file)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(version.encode()).hexdigest()[:8]
    target = cache_dir() / f"{Path(source).stem}_{source_key(source)}_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run(nvcc_command(compiler, source, tmp), capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=1)
def library():
    """The loaded kernel library, or ``None`` (see ``build_error``)."""
    compiler = nvcc()
    path = prebuilt() if compiler is None else None
    if compiler is None and path is None:
        _errors.append(missing())
        return None
    try:
        return load(path or build(compiler))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        what = f"loading {path}" if path else f"building {SOURCE.name} with {compiler}"
        _errors.append(f"{what} failed: {detail.strip()[-2000:]}")
        return None


class StaFwdArgs(ctypes.Structure):
    """``StaFwdArgs`` of ``sta_fwd_cuda_args.h``, field for field (pointers as
    ``c_void_p``; ``tests/test_cuda_build.py`` checks names, order and C types against the
    header; :func:`load` checks the size against the library's)."""

    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    _fields_ = [
        ("q", P), ("k", P), ("v", P), ("out", P), ("lse", P), ("heads", P), ("n_heads", I),
        ("q_tiles", P), ("q_stride", I), ("n_q_tiles", I), ("kv_tiles", P), ("kv_stride", I),
        ("packed", I), ("f16", I), ("B", I), ("T", I), ("H", I), ("W", I), ("TT", I), ("TH", I), ("TW", I),
        ("q_heads", I), ("kv_heads", I),
        ("s_q", L), ("s_kv", L), ("sq_b", L), ("sq_s", L), ("sk_b", L), ("sk_s", L), ("sv_b", L), ("sv_s", L),
        ("so_b", L), ("so_s", L), ("lse_b", L), ("lse_h", L),
        ("sel_keys", P), ("sel_counts", P), ("sel_strides", L * 5), ("text_row", I), ("n_text", I),
        ("k_halo", P), ("v_halo", P), ("halo_rows", L), ("sh_b", L), ("sh_s", L),
        ("clip", I * 6), ("resume", I), ("scale", ctypes.c_float), ("stream", P),
    ]
    del P, I, L


def load(path: Path):
    """A built library, its entry points' signatures declared; ``OSError`` if it is not
    this interface's (a source from before the struct, or a header that changed since)."""
    lib = ctypes.CDLL(str(path))
    try:
        lib.sta_fwd_cuda_launch.argtypes = [ctypes.POINTER(StaFwdArgs)]
        lib.sta_fwd_cuda_args_size.argtypes = []
    except AttributeError as err:
        raise OSError(f"{path} has no sta_fwd_cuda_launch(const StaFwdArgs*) (built from a source older than "
                      f"sta_fwd_cuda_args.h?): {err}") from None
    lib.sta_fwd_cuda_launch.restype = lib.sta_fwd_cuda_args_size.restype = ctypes.c_int
    size = lib.sta_fwd_cuda_args_size()
    if size != ctypes.sizeof(StaFwdArgs):
        raise OSError(f"{path}: sizeof(StaFwdArgs) is {size} there, {ctypes.sizeof(StaFwdArgs)} here (another "
                      f"sta_fwd_cuda_args.h)")
    return lib


def missing() -> str | None:
    """Why the library cannot even be tried here (no compiler and nothing prebuilt), else
    ``None``."""
    if nvcc() or prebuilt():
        return None
    return (f"needs nvcc to build (set STA_DIST_NVCC, or put nvcc on the PATH), or a library built ahead of time "
            f"in {cache_dir()} (python -m sta_dist.kernels.sta_fwd_cuda where nvcc is)")


def build_error() -> str | None:
    """Why ``library()`` is ``None`` (after a call to it), else ``None``."""
    return _errors[-1] if _errors else None


def available() -> bool:
    return library() is not None


def sta_fwd_cuda(q, k, v, heads, out, *, canvas, tile, scale, text_keys=0, order="natural", tables=None, lse=None,
                 keys=None, halo=None, clip=None, resume=False):
    """Fill the video rows of ``out`` (``q``'s shape and dtype, heads adjacent) with sliding tile
    attention for the head rows of ``heads [n, 5]`` (int32 ``(kt, kh, kw, kv_head,
    q_head)``, on q's device). ``q``, ``k``, ``v`` are ``[B, S, H, D]``, bf16 or fp16,
    placed by ``order``:

    - ``"natural"``: the whole canvas first, token ``(t, h, w)`` at row ``(t*H + h)*W + w``;
    - ``"packed"``: tiles of consecutive rows, each tile's tokens in ``(t, h, w)`` order
      inside it (as ``sta_dist.to_tiled`` lays them), wherever ``tables = (q_tiles,
      kv_tiles, kv_video)`` put them: ``q_tiles [n_q, >=2]`` int32 holds per query tile to
      compute (global tile id, first row in q), ``kv_tiles [n_tiles, >=1]`` per global tile
      its first row in k/v (read for the tiles some window reaches), and text keys start at
      k/v row ``kv_video`` (``sta_dist.kernel_calls.packed_tables`` makes them for any
      ``LocalLayout``). With ``halo = (k_halo, v_halo)`` (``[B, S_h, Hkv, D]``, equal
      strides) a ``kv_tiles`` entry ``~r`` (negative) is row ``r`` of those: a tile-mode
      rank's received halo, read where it lies (``kernel_calls.halo_tables``).

    Video queries attend their window's key tiles, or with ``keys`` (a
    :class:`sta_dist.selection.tables.KeyTiles`: per sample, query head and query tile of
    the launch, its list of global key tile ids) the tiles of their list, and the first
    ``text_keys`` text rows; text query rows of ``out`` are not written. ``lse``, if given, ``[B, Hq, S]`` float32 (last dim
    contiguous), gets the natural-log log-sum-exp of the video rows.

    ``clip = (lo, hi)`` (tile coordinates, per axis) cuts every window to the key tiles in
    ``[lo, hi)`` (a tile-mode rank's box; a neighbour's box, its halo). ``resume=True``
    (needs ``lse``): the video rows of ``out`` and ``lse`` hold an earlier launch's result
    over other keys of the same queries; this launch folds its keys in and writes both back
    (a row none of its keys reaches is left as it was). Raises if the call breaks
    :func:`rules.cuda_call_reason` or the library is missing."""
    packed = order == "packed"
    if packed and tables is None:
        raise ValueError("sta_fwd_cuda: order='packed' needs tables=(q_tiles, kv_tiles, kv_video)")
    kv_video = tables[2] if packed else math.prod(canvas)
    reason = rules.cuda_call_reason(dtype=str(q.dtype).removeprefix("torch."), head_dim=q.shape[3],
                                    canvas=tuple(canvas), tile=tuple(tile), order=order,
                                    kv_rows=min(k.shape[1], v.shape[1]), kv_video=kv_video, text_keys=text_keys,
                                    bulk_copy=bulk_copy_layout_ok(q, k, v))
    if reason:
        raise ValueError(f"sta_fwd_cuda: unsupported call: the kernel {reason}")
    if (out.shape != q.shape or out.dtype != q.dtype or out.stride(3) != 1 or out.stride(2) != q.shape[3]
            or out.stride(1) % 2 or (out.shape[0] > 1 and out.stride(0) % 2) or out.data_ptr() % 4):
        raise ValueError(f"sta_fwd_cuda: out must have q's shape and dtype, its heads adjacent and even row and "
                         f"batch strides (the kernel stores pairs of values), got {tuple(out.shape)} {out.dtype} "
                         f"strides {out.stride()} for q {tuple(q.shape)} {q.dtype}")
    if lse is not None and (lse.shape != (q.shape[0], q.shape[2], q.shape[1]) or lse.dtype != torch.float32
                            or lse.stride(2) != 1):
        raise ValueError(f"sta_fwd_cuda: lse must be [B, Hq, S] float32 with the last dim contiguous, got "
                         f"{tuple(lse.shape)} {lse.dtype} strides {lse.stride()}")
    q_tiles, kv_tiles = tables[:2] if packed else (heads, heads)  # unread in natural order
    if packed and (q_tiles.stride(1) != 1 or kv_tiles.stride(1) != 1):
        raise ValueError("sta_fwd_cuda: the tables' rows must be contiguous")
    k_halo, v_halo = halo if halo is not None else (None, None)
    if halo is not None and (not packed or k_halo.stride() != v_halo.stride() or k_halo.shape != v_halo.shape
                             or k_halo.shape[0] != k.shape[0] or k_halo.shape[2:] != k.shape[2:]
                             or k_halo.dtype != k.dtype):
        raise ValueError(f"sta_fwd_cuda: halo=(k_halo, v_halo) needs order='packed' and two tensors of k's batch, "
                         f"heads, head dim and dtype with equal strides, got order={order!r}, "
                         f"{tuple(k_halo.shape)} strides {k_halo.stride()}, {tuple(v_halo.shape)} strides "
                         f"{v_halo.stride()} beside k {tuple(k.shape)}")
    if resume and lse is None:
        raise ValueError("sta_fwd_cuda: resume=True folds keys into out and lse: it needs lse")
    if clip is not None and keys is not None:
        raise ValueError("sta_fwd_cuda: clip cuts windows; a call with key tables (keys=) has none")
    lo, hi = clip if clip is not None else ((0, 0, 0), tuple(-(-c // t) for c, t in zip(canvas, tile)))
    sel_keys, sel_counts, sel_strides = _key_tables(keys)
    lib = library()
    if lib is None:
        raise RuntimeError(f"sta_fwd_cuda: kernel library unavailable: {build_error()}")
    T, H, W = canvas
    n = heads.shape[0]
    B = q.shape[0]
    n_q = q_tiles.shape[0] if packed else 0
    if n == 0 or B == 0 or (packed and n_q == 0):
        return out
    stream = torch.cuda.current_stream(q.device).cuda_stream
    args = StaFwdArgs(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
        lse=lse.data_ptr() if lse is not None else None, heads=heads.data_ptr(), n_heads=n,
        q_tiles=q_tiles.data_ptr(), q_stride=q_tiles.stride(0), n_q_tiles=n_q,
        kv_tiles=kv_tiles.data_ptr(), kv_stride=kv_tiles.stride(0),
        packed=int(packed), f16=int(q.dtype == torch.float16), B=B, T=T, H=H, W=W, TT=tile[0], TH=tile[1],
        TW=tile[2], q_heads=q.shape[2], kv_heads=k.shape[2],
        s_q=q.shape[1], s_kv=min(k.shape[1], v.shape[1]), sq_b=q.stride(0), sq_s=q.stride(1), sk_b=k.stride(0),
        sk_s=k.stride(1), sv_b=v.stride(0), sv_s=v.stride(1), so_b=out.stride(0), so_s=out.stride(1),
        lse_b=lse.stride(0) if lse is not None else 0, lse_h=lse.stride(1) if lse is not None else 0,
        sel_keys=sel_keys, sel_counts=sel_counts, sel_strides=sel_strides, text_row=kv_video, n_text=text_keys,
        k_halo=None if halo is None else k_halo.data_ptr(), v_halo=None if halo is None else v_halo.data_ptr(),
        halo_rows=0 if halo is None else k_halo.shape[1], sh_b=0 if halo is None else k_halo.stride(0),
        sh_s=0 if halo is None else k_halo.stride(1), clip=(ctypes.c_int * 6)(*lo, *hi), resume=int(resume),
        scale=scale * LOG2E, stream=stream)
    rc = lib.sta_fwd_cuda_launch(ctypes.byref(args))
    if rc:
        raise RuntimeError(f"sta_fwd_cuda: launch failed with code {rc} (1: no tensor-map encoder; 100+: CUresult of "
                           f"a tensor map; 1000+: cudaError_t)")
    return out



def _key_tables(keys):
    """The launch's key-table arguments: the keys' and counts' pointers (``None`` without
    tables) and their strides (batch, head, query tile; counts batch, head), 0 where one
    list serves every sample or head."""
    if keys is None:
        return None, None, (ctypes.c_longlong * 5)()
    k, c = keys.keys, keys.counts
    if k.dtype != torch.int32 or c.dtype != torch.int32 or k.stride(-1) != 1 or c.stride(-1) != 1:
        raise ValueError(f"sta_fwd_cuda: key tables must be int32 with a contiguous last dim, got {k.dtype}, "
                         f"{c.dtype}")
    strides = (k.stride(0) if k.shape[0] > 1 else 0, k.stride(1) if k.shape[1] > 1 else 0, k.stride(2),
               c.stride(0) if c.shape[0] > 1 else 0, c.stride(1) if c.shape[1] > 1 else 0)
    return k.data_ptr(), c.data_ptr(), (ctypes.c_longlong * 5)(*strides)

if __name__ == "__main__":  # build ahead of time (no GPU needed): python -m sta_dist.kernels.sta_fwd_cuda
    import sys

    compiler = nvcc()
    if compiler is None:
        sys.exit(missing())
    try:
        print(build(compiler))
    except subprocess.CalledProcessError as err:
        sys.exit(f"building {SOURCE.name} with {compiler} failed: {err.stderr.strip()[-2000:]}")
