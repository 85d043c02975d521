"""Runs one local call: describes it and its device for :func:`sta_dist.route.route`, then
calls the kernels the route names (:mod:`sta_dist.kernel_calls`, the torch backend).

Below the public face: :mod:`sta_dist.api` (one device) and :mod:`sta_dist.parallel.runtime`
(a rank's call) both come here.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch

from . import kernel_calls as calls
from .kernels.descriptors import bulk_copy_layout_ok
from .local import Halo, LocalHeads, LocalLayout, LocalText, sample_groups, tile_row_index
from .route import BACKENDS, Call, Device, Route, route
from .torch_backend import sta_torch
from .validation import kernel_head_dim


def device_facts(device: torch.device) -> Device:
    """What the route needs to know of ``device`` (cached; a failed CUDA build shows)."""
    from .kernels import sta_bwd_cuda, sta_fwd_cuda

    return _device_facts(device, sta_fwd_cuda.build_error(), sta_bwd_cuda.build_error() or cuda_backward_gate(),
                         os.environ.get("TRITON_INTERPRET") == "1")


def cuda_backward_gate() -> Optional[str]:
    """:data:`UNVERIFIED_BACKWARD` unless ``STA_DIST_CUDA_BACKWARD=1`` is set."""
    return None if os.environ.get("STA_DIST_CUDA_BACKWARD") == "1" else UNVERIFIED_BACKWARD


UNVERIFIED_BACKWARD = "is not yet checked on a GPU (STA_DIST_CUDA_BACKWARD=1 takes it)"
"""Why a Hopper GPU's route does not take the CUDA backward by default: its block schedule
is checked on the CPU (tests/test_backward_schedule.py), its matrix products only where a
GPU runs tests/test_backward_gpu.py (tools/backward_gpu.sh)."""


@functools.lru_cache(maxsize=16)
def _device_facts(device: torch.device, cuda_build_error, cuda_backward_build_error, interpreted: bool) -> Device:
    triton = None
    if device.type != "cuda" and not (interpreted and device.type == "cpu"):
        triton = (f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before triton is imported), "
                  f"the tensors are on {device}")
    else:
        try:
            import triton as _  # noqa: F401
        except ImportError as err:
            triton = f"needs the triton package: {err}"
    if device.type != "cuda":
        return Device(device.type, None, triton)
    capability = torch.cuda.get_device_capability(device)
    cuda_library = cuda_backward_library = None
    if capability[0] == 9:
        from .kernels import sta_fwd_cuda

        cuda_library = cuda_build_error or sta_fwd_cuda.missing()
        cuda_backward_library = cuda_backward_build_error or sta_fwd_cuda.missing()
    return Device("cuda", capability, triton, cuda_library, cuda_backward_library)


def describe(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText,
             return_lse: bool = False, table: bool = False, halo: Optional[Halo] = None) -> Call:
    """The route's view of one local call (one text group) on these tensors (k/v rows
    counted with the ``halo``'s, which the kernels read where they lie)."""
    call = layout_call(layout, heads, text, str(q_bshd.dtype).removeprefix("torch."), q_bshd.shape[3],
                       return_lse, table, q_bshd.device)
    kv_rows = min(k_bshd.shape[1], v_bshd.shape[1]) + (0 if halo is None else halo.k.shape[1])
    apart = () if halo is None else (halo.k, halo.v)
    return dataclasses.replace(call, q_rows=q_bshd.shape[1], kv_rows=kv_rows,
                               bulk_copy=bulk_copy_layout_ok(q_bshd, k_bshd, v_bshd, *apart))


def layout_call(layout: LocalLayout, heads: LocalHeads, text: LocalText, dtype: str, head_dim: int,
                return_lse: bool = False, table: bool = False, device: torch.device = torch.device("cpu")) -> Call:
    """The route's view of a call on contiguous tensors holding what ``layout`` says (what
    ``sta-dist doctor`` routes without tensors); ``device``: where the layout's tables are
    cached (the call's own device, so that its launch finds them built)."""
    facts = calls.layout_facts(layout, device)
    order = ("natural" if facts.whole_natural else
             "packed" if facts.even and facts.packed and facts.q_packed else "other")
    aligned = layout.q_video % 4 == 0 and (order == "natural" or all(r.base % 4 == 0 for r in layout.q_rows))
    return Call(dtype=dtype, head_dim=head_dim, canvas=layout.canvas, tile=layout.tile, order=order,
                rows_aligned=aligned,
                heads=len(heads.windows), q_rows=layout.q_video + layout.q_text,
                kv_rows=layout.kv_video + layout.q_text, kv_video=layout.kv_video, text_keys=text.kv_for_video_q,
                q_text=layout.q_text, text_dense=calls.text_by_sdpa(layout, text),
                dense_heads=calls.dense_heads(layout, heads, text, facts.complete), return_lse=return_lse,
                table=table)


def choose_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """``"torch"`` when the torch backend runs calls of ``backend`` on ``q``'s device, else
    ``"triton"`` (the kernels :func:`sta_dist.route.route` chooses among); ``"triton"``
    asked for where it cannot run is refused with the reason (the route refuses the rest)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    device = device_facts(q.device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and device.triton is None else "torch"
    if backend == "triton" and device.triton:
        raise ValueError(f"backend='triton' cannot run here: the triton kernel {device.triton}")
    return "torch" if backend == "torch" else "triton"


def call_route(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText,
               backend: str = "auto", return_lse: bool = False, table: bool = False,
               halo: Optional[Halo] = None) -> Route:
    """The route of one local call on its tensors' device (what :func:`run_local` runs)."""
    return _route(describe(q_bshd, k_bshd, v_bshd, layout, heads, text, return_lse, table, halo),
                  device_facts(q_bshd.device), backend)


_route = functools.lru_cache(maxsize=1024)(route)


def run_local(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText, scale: float,
              backend: str = "auto", return_lse: bool = False, keys=None, config: dict | None = None,
              out: Optional[torch.Tensor] = None, halo: Optional[Halo] = None, lse: Optional[torch.Tensor] = None,
              resume: bool = False):
    """One local call with one text group, on the kernels its route names. ``keys``: the
    table path (:class:`~sta_dist.selection.tables.KeyTiles`); ``config``: a Triton launch
    config (``backend="triton"`` only). The Triton family runs head dims 160, 192 and 224
    zero-padded to the next built size. ``out``: the output to fill, only the rows of this
    call's queries (window calls without the log-sum-exp); ``halo``: k/v rows held apart
    (:class:`~sta_dist.local.Halo`), read where they lie by the CUDA kernel, joined to
    k/v for any other. ``resume=True`` with ``out`` and ``lse`` (``[B, H, S]`` float32): they
    hold a result of the same queries over other keys (e.g. the layout's ``key_box`` of an
    earlier call, or other key lists), and this call's keys are folded in exactly (the CUDA
    kernel in its launch, any other by the log-sum-exp merge of :func:`fold_rows`); the
    layout then has no text query rows; returns ``(out, lse)``."""
    if config is not None and backend != "triton":
        raise ValueError(f"a Triton launch config needs backend='triton', got backend={backend!r}")
    if resume:
        if out is None or lse is None:
            raise ValueError("run_local: resume=True needs out= and lse=")
        if layout.q_text:  # the CUDA route would give text rows to SDPA afresh, not fold them
            raise ValueError(f"run_local: resume=True folds keys into video query rows; the layout must have no "
                             f"text query rows, got q_text={layout.q_text}")
        r = None if choose_backend(q_bshd, backend) == "torch" else call_route(
            q_bshd, k_bshd, v_bshd, layout, heads, text, backend, True, keys is not None, halo)
        if r is None or r.video != "cuda":
            part = run_local(q_bshd, k_bshd, v_bshd, layout, heads, text, scale, backend, True, keys=keys,
                             config=config, halo=halo)
            return fold_rows(out, lse, *part, query_rows(layout, out.device))
        return execute(r, q_bshd, k_bshd, v_bshd, layout, heads, text, scale, True, keys, config, out, halo, lse, True)
    if out is not None and (return_lse or keys is not None):
        raise ValueError("run_local: out= is for window calls without the log-sum-exp")
    D = q_bshd.shape[-1]
    padded = kernel_head_dim(D)
    if choose_backend(q_bshd, backend) == "torch" or padded != D:
        if halo is not None:
            k_bshd, v_bshd = halo.joined(k_bshd, v_bshd)
        if padded == D:
            result = sta_torch(q_bshd, k_bshd, v_bshd, layout, heads, text, scale, return_lse=return_lse, keys=keys)
        else:  # zero columns change no score q.k and give zero output columns, cut off again
            q_p, k_p, v_p = (torch.nn.functional.pad(x, (0, padded - D)) for x in (q_bshd, k_bshd, v_bshd))
            result = run_local(q_p, k_p, v_p, layout, heads, text, scale, backend, return_lse, keys, config)
            result = (result[0][..., :D].contiguous(), result[1]) if return_lse else result[..., :D].contiguous()
        return result if out is None else _fill_rows(out, result, layout)
    r = call_route(q_bshd, k_bshd, v_bshd, layout, heads, text, backend, return_lse, keys is not None, halo)
    if r.video == "cuda":
        from .kernels import sta_fwd_cuda

        if not sta_fwd_cuda.available():  # the build failed: route again, now knowing why
            r = call_route(q_bshd, k_bshd, v_bshd, layout, heads, text, backend, return_lse, keys is not None, halo)
    if halo is not None and (r.video != "cuda" or r.dense):  # only the CUDA kernel reads a halo where it lies
        k_bshd, v_bshd = halo.joined(k_bshd, v_bshd)
        halo = None
        r = call_route(q_bshd, k_bshd, v_bshd, layout, heads, text, backend, return_lse, keys is not None)
    return execute(r, q_bshd, k_bshd, v_bshd, layout, heads, text, scale, return_lse, keys, config, out, halo)


def fold_rows(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
              rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``out``/``lse`` with ``rows`` merged with another result of the same queries over other
    keys (the exact softmax merge by log-sum-exp; rows with no key on either side stay 0)."""
    outs = torch.stack([out[:, rows], part_out[:, rows]]).float()  # [2, B, n, H, D]
    lses = torch.stack([lse[:, :, rows], part_lse[:, :, rows]]).transpose(2, 3)  # [2, B, n, H]
    merged, total = merge_partials(outs, lses)
    out[:, rows] = merged.to(out.dtype)
    lse[:, :, rows] = total.transpose(1, 2)
    return out, lse


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact softmax merge of results of the same queries over disjoint keys: ``outs
    [R, ..., D]`` (normalised, float) and their natural-log ``lses [R, ...]`` -> the merged
    output and log-sum-exp (a row no part has a key for: 0 and ``-inf``)."""
    total = torch.logsumexp(lses, 0)
    weights = torch.exp(lses - torch.where(torch.isinf(total), 0.0, total)).nan_to_num(0.0)
    return (weights[..., None] * outs).sum(0), total


def _fill_rows(out: torch.Tensor, result: torch.Tensor, layout: LocalLayout) -> torch.Tensor:
    """``out`` with the rows of ``layout``'s queries (its video tiles, its text rows) taken
    from ``result``."""
    rows = query_rows(layout, out.device)
    out[:, rows] = result[:, rows]
    return out


@functools.lru_cache(maxsize=64)
def query_rows(layout: LocalLayout, device: torch.device) -> torch.Tensor:
    """Rows of ``q`` that ``layout``'s queries fill: its video tiles' tokens, then its text
    rows."""
    idx, ok = tile_row_index(layout.q_rows, layout.q_tiles, layout.canvas, layout.tile)
    text = torch.arange(layout.q_video, layout.q_video + layout.q_text)
    return torch.cat([idx[ok], text]).to(device)


def execute(r: Route, q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text: LocalText,
            scale: float, return_lse: bool = False, keys=None, config: dict | None = None,
            out: Optional[torch.Tensor] = None, halo: Optional[Halo] = None, lse: Optional[torch.Tensor] = None,
            resume: bool = False):
    """Run route ``r``: SDPA for its dense heads, its video kernel for the other heads'
    video rows and, beside the CUDA kernel, its text kernel for their text rows on a
    second stream (the caller's stream waits for it before the result is returned).
    ``out``: fill the rows of the call's queries there (else a new output); ``halo``: the
    CUDA kernel's k/v rows held apart; ``lse``: the log-sum-exp to fill (else a new one);
    ``resume``: the CUDA kernel folds the call's keys into ``out`` and ``lse``."""
    if r.video == "torch":
        result = sta_torch(q_bshd, k_bshd, v_bshd, layout, heads, text, scale, return_lse=return_lse, keys=keys)
        return result if out is None else _fill_rows(out, result, layout)
    B, S, H, _ = q_bshd.shape
    sparse = tuple(h for h in range(H) if h not in r.dense)
    if r.video == "triton" and not r.dense:
        return calls.triton(q_bshd, k_bshd, v_bshd, layout, heads, text, scale, sparse, out=out,
                            return_lse=return_lse, config=config, keys=keys)
    if not sparse and out is None and layout.q_video + text.q_valid == S:  # plain dense attention, no padding rows
        return calls.sdpa_dense(q_bshd, k_bshd, v_bshd, layout, heads, text, r.dense, scale, None)
    if out is None:
        out = torch.empty(q_bshd.shape, dtype=q_bshd.dtype, device=q_bshd.device)
    if r.dense:
        calls.sdpa_dense(q_bshd, k_bshd, v_bshd, layout, heads, text, r.dense, scale, out)
    if not sparse:
        return out
    if r.video == "triton":
        return calls.triton(q_bshd, k_bshd, v_bshd, layout, heads, text, scale, sparse, out, return_lse, config)
    table = calls.head_table(heads, sparse, q_bshd.device)
    if return_lse and lse is None:
        lse = torch.empty((B, H, S), dtype=torch.float32, device=q_bshd.device)
    main = torch.cuda.current_stream(q_bshd.device)
    if r.text:
        side = calls.text_stream(q_bshd.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            if r.text == "sdpa":
                calls.sdpa_text(q_bshd, k_bshd, v_bshd, layout, heads, text, sparse, scale, out, lse)
            else:
                calls.triton(q_bshd, k_bshd, v_bshd, layout, heads, text, scale, sparse, out, return_lse,
                             lse=lse, video=False)
    calls.cuda(q_bshd, k_bshd, v_bshd, layout, text, scale, table, out, lse, keys, halo, resume)
    if r.text:
        main.wait_stream(side)
    return (out, lse) if return_lse else out


def local_attention(q_bshd, k_bshd, v_bshd, layout: LocalLayout, heads: LocalHeads, text,
                    scale: float, backend: str = "auto", return_lse: bool = False, keys=None,
                    out: Optional[torch.Tensor] = None, halo: Optional[Halo] = None,
                    lse: Optional[torch.Tensor] = None, resume: bool = False):
    """Run one local STA problem (inputs already validated).

    ``text`` is one :class:`LocalText` for the whole batch, or a tuple of one per batch
    sample: then the batch is split into groups of samples with equal text, and each
    group runs as its own call (one kernel launch per distinct text length; a contiguous
    run of samples is a view, others are gathered). ``keys``: the table path
    (:class:`sta_dist.selection.tables.KeyTiles`), split with the batch. ``out``, ``halo``,
    ``lse``, ``resume``: as :func:`run_local` (one text group only)."""
    run = functools.partial(run_local, layout=layout, heads=heads, scale=scale, backend=backend,
                            return_lse=return_lse)
    apart = dict(out=out, halo=halo, lse=lse, resume=resume)
    if isinstance(text, LocalText):
        return run(q_bshd, k_bshd, v_bshd, text=text, keys=keys, **apart)
    groups = sample_groups(text)
    if len(groups) == 1:
        return run(q_bshd, k_bshd, v_bshd, text=groups[0][0], keys=keys, **apart)
    if out is not None or halo is not None or resume:
        raise ValueError("local_attention: out=, halo= and resume= take one text length for the whole batch")
    B, S, H, _ = q_bshd.shape
    out = torch.empty_like(q_bshd)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q_bshd.device) if return_lse else None
    for group_text, idx in groups:
        result = run(q_bshd[idx], k_bshd[idx], v_bshd[idx], text=group_text,
                     keys=None if keys is None else keys.samples(idx))
        if return_lse:
            out[idx], lse[idx] = result
        else:
            out[idx] = result
    return (out, lse) if return_lse else out
