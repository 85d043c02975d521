"""Which kernel runs a local call, and why each faster one does not: a decision as data.

``route(call, device, backend) -> Route`` is a pure function of two frozen descriptions,
the call's (:class:`Call`: dtype, head dim, token order, rows, text, heads) and the
device's (:class:`Device`: type, capability, what failed to import or build). Each kernel
answers ``can_run(kernel, call, device, raise_error)`` from its rule below, so the
automatic choice and an explicit ``backend=`` request give the same reasons. Nothing here
touches a tensor or the environment: :mod:`sta_dist.dispatch` builds the descriptions
from the tensors and runs the route, and a test or ``sta-dist doctor`` can build them by
hand for any machine.

Kernels, fastest first (``auto`` takes the first that can run the video queries):

- ``cuda``: the hand-written Hopper kernel (``kernels/sta_fwd_cuda.cu``); the whole
  canvas in natural order or whole tiles placed by tables (tiled order, a head-mode rank,
  a tile-mode rank's box and halo), in blocks of 128 rows; windows or per-query-tile key
  lists (selected tiles, other window rules); bf16 or fp16, head dim 128; the log-sum-exp
  too. Built with ``nvcc`` on first use.
- ``triton``: the portable Triton kernel (``kernels/sta_fwd.py``); every case, on any
  CUDA GPU, and on a CPU under ``TRITON_INTERPRET=1`` (tests).
- ``torch``: the torch backend (``torch_backend.py``); every case, any device.

With ``auto`` on a GPU, heads whose window covers the whole grid go to SDPA (cuDNN) when
the call is complete and asks no log-sum-exp, unless the CUDA kernel takes the call (it
is faster on them too); text query rows go to SDPA when their keys are one range of k/v
(with the log-sum-exp through FlashAttention's), else to a Triton launch with no video
query tiles, beside the CUDA kernel's launch.
An explicit kernel takes every head's video rows (``triton`` and ``torch``: the text rows
too).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from .kernels import rules as kernel_rules
from .kernels.descriptors import bulk_copy_layout_ok

KERNELS = ("cuda", "triton", "torch")
"""Every kernel, fastest first."""
BACKENDS = ("auto",) + KERNELS

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class Device:
    """What a route needs to know of the device the tensors are on."""

    type: str
    """``"cuda"``, ``"cpu"``, ..."""
    capability: Optional[tuple[int, int]] = None
    """The GPU's compute capability; ``None`` off a GPU."""
    triton: Optional[str] = None
    """Why the Triton kernel cannot run here (no triton, a CPU without the interpreter);
    ``None``: it can."""
    cuda_library: Optional[str] = None
    """Why the CUDA kernel's library cannot load (no nvcc and nothing built ahead of time,
    a failed build); ``None``: it is loaded, or will be built or loaded on first use."""
    cuda_backward_library: Optional[str] = None
    """The same for the CUDA backward's library (``kernels/sta_bwd_cuda.cu``)."""

    @staticmethod
    def hopper() -> "Device":
        """An H100/H200 with triton and nvcc: what the routes of ``sta-dist doctor
        --assume-gpu`` and the CPU tests take."""
        return Device("cuda", (9, 0))

    @staticmethod
    def cpu(interpreter: bool = False) -> "Device":
        return Device("cpu", None, None if interpreter else
                      "a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")


@dataclass(frozen=True)
class Call:
    """One local call, as the kernels' rules see it (a device-free description)."""

    dtype: str
    """``"bfloat16"``, ``"float16"`` or ``"float32"``."""
    head_dim: int
    """As the kernels get it (the Triton family pads 160/192/224 to the next built size)."""
    canvas: Triple
    tile: Triple
    order: str
    """``"natural"``: q, k and v hold the whole canvas in natural order, then the text;
    ``"packed"``: whole tiles of consecutive rows, placed by tables (tiled order, a
    head-mode rank's tiled tokens, a tile-mode rank's box and halo); ``"other"``."""
    heads: int
    q_rows: int
    kv_rows: int
    kv_video: int
    """The first text row of k/v."""
    text_keys: int = 0
    """Text key rows the video queries attend."""
    q_text: int = 0
    """Text query rows."""
    text_dense: bool = True
    """The text queries' keys are one range of k/v: plain dense attention (SDPA, with the
    log-sum-exp through FlashAttention's)."""
    dense_heads: tuple[int, ...] = ()
    """Heads that are plain dense attention here (window covers the grid, complete layout,
    uniform text)."""
    bulk_copy: bool = True
    """The copy engine can read q, k and v: heads adjacent, row and batch strides 16-byte
    multiples."""
    return_lse: bool = False
    table: bool = False
    """Per-query-tile key-tile lists (selected tiles, windows of other rules)."""
    rows_aligned: bool = True
    """Each query tile's first row and the first text query row are multiples of 4."""

    @staticmethod
    def of(q, k, v, canvas, tile, order: str, *, kv_video: Optional[int] = None, **facts) -> "Call":
        """The description of ``q [B, Sq, H, D]``, ``k, v [B, Skv, Hkv, D]`` from their
        shapes, dtype and strides alone; ``facts``: the remaining fields (default: no text,
        no dense heads, no log-sum-exp, windows)."""
        return Call(dtype=str(q.dtype).removeprefix("torch."), head_dim=q.shape[3], canvas=tuple(canvas),
                    tile=tuple(tile), order=order, heads=q.shape[2], q_rows=q.shape[1],
                    kv_rows=min(k.shape[1], v.shape[1]), kv_video=math.prod(canvas) if kv_video is None else kv_video,
                    bulk_copy=bulk_copy_layout_ok(q, k, v), **facts)

    @property
    def whole_tiles(self) -> bool:
        return all(c % t == 0 for c, t in zip(self.canvas, self.tile))


def cuda_rule(call: Call, device: Device) -> Optional[str]:
    """Why the CUDA kernel cannot take the call's video queries; ``None``: it can (the
    kernel's own rules, ``kernels/rules.py``, and whether its library loads)."""
    return (kernel_rules.cuda_device_reason(device.type, device.capability) or device.cuda_library
            or kernel_rules.cuda_call_reason(dtype=call.dtype, head_dim=call.head_dim, canvas=call.canvas,
                                             tile=call.tile, order=call.order, kv_rows=call.kv_rows,
                                             kv_video=call.kv_video, text_keys=call.text_keys,
                                             bulk_copy=call.bulk_copy))


def cuda_backward_rule(call: Call, device: Device) -> Optional[str]:
    """Why the CUDA backward cannot take the call; ``None``: it can (``kernels/rules.py``
    and whether its library loads). The natural canvas goes through tiled order
    (``backward.cuda_backward``)."""
    return (kernel_rules.cuda_device_reason(device.type, device.capability) or device.cuda_backward_library
            or kernel_rules.cuda_backward_reason(dtype=call.dtype, head_dim=call.head_dim, canvas=call.canvas,
                                                 tile=call.tile, packed=call.order in ("packed", "natural"),
                                                 even=call.whole_tiles, rows_aligned=call.rows_aligned,
                                                 bulk_copy=call.bulk_copy))


def triton_rule(call: Call, device: Device) -> Optional[str]:
    """Why the Triton kernel cannot run here; ``None``: it can (every call; on a CPU,
    under the interpreter, every dtype but bfloat16, whose ``tl.dot`` the interpreter
    computes wrongly)."""
    if device.triton is None and device.type == "cpu" and call.dtype == "bfloat16":
        return "runs bfloat16 wrongly under the CPU interpreter (its tl.dot)"
    return device.triton


def torch_rule(call: Call, device: Device) -> Optional[str]:
    """The torch backend runs every call on every device."""
    return None


RULES = {"cuda": cuda_rule, "triton": triton_rule, "torch": torch_rule}


def can_run(kernel: str, call: Call, device: Device, raise_error: bool = False) -> bool:
    """Whether ``kernel`` can take ``call`` on ``device``; with ``raise_error`` a refusal
    is a ``ValueError`` that says why."""
    reason = RULES[kernel](call, device)
    if reason and raise_error:
        raise ValueError(f"backend={kernel!r} cannot run this call: the {kernel} kernel {reason}")
    return reason is None


@dataclass(frozen=True)
class Route:
    """How one local call runs."""

    video: Optional[str]
    """The kernel for the video query rows of every head not in ``dense`` (``None``: no
    such head). ``"triton"`` and ``"torch"`` take that whole call, text rows too."""
    text: Optional[str] = None
    """Beside the CUDA kernel: ``"sdpa"`` or ``"triton"`` (a launch with no video query
    tiles) for the text query rows; ``None`` otherwise."""
    dense: tuple[int, ...] = ()
    """Heads SDPA (cuDNN) runs whole: their window covers the grid."""
    declined: tuple[tuple[str, str], ...] = ()
    """Each faster kernel not taken, with why."""
    backward: Optional[str] = dataclasses.field(default=None, compare=False)
    """The kernel of the call's backward (:mod:`sta_dist.backward`): ``"triton"`` or
    ``"torch"`` (not compared: routes are equal by their forward)."""
    backward_declined: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)
    """Each faster backward kernel not taken, with why."""

    def describe(self) -> str:
        """One line: what runs where, then why the faster kernels were not taken."""
        parts = []
        if self.dense:
            parts.append(f"heads {_heads(self.dense)}: sdpa (whole grid)")
        if self.video:
            parts.append(f"{'other heads' if self.dense else 'video'}: {self.video}")
        if self.text:
            parts.append(f"text queries: {self.text}")
        why = "; ".join(f"not {k}: {reason}" for k, reason in self.declined)
        return ", ".join(parts) + (f" ({why})" if why else "")

    def describe_backward(self) -> str:
        """One line: the backward's kernel, then why the faster ones were not taken."""
        why = "; ".join(f"not {k}: {reason}" for k, reason in self.backward_declined)
        return f"backward: {self.backward}" + (f" ({why})" if why else "")


def _heads(heads: tuple[int, ...]) -> str:
    return ", ".join(map(str, heads)) if len(heads) <= 8 else f"{len(heads)} of them"


def _forward_route(call: Call, device: Device, backend: str = "auto") -> Route:
    """The kernels that run ``call`` on ``device``. ``backend="auto"`` takes the fastest
    that can; a kernel's name asks for it and raises ``ValueError`` with its reason if it
    cannot. Off a GPU ``auto`` takes the torch backend (the Triton interpreter is for
    tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    if backend != "auto":
        can_run(backend, call, device, raise_error=True)
        return Route(backend, _text(call, backend))
    declined = []
    if device.type != "cuda":
        declined = [("cuda", cuda_rule(call, device) or "")]
        declined.append(("triton", device.triton or "off a GPU auto takes the torch backend (the interpreter is for tests)"))
        return Route("torch", declined=tuple(declined))
    for kernel in KERNELS:
        reason = RULES[kernel](call, device)
        if reason is None:
            break
        declined.append((kernel, reason))
    dense = () if kernel == "cuda" or call.return_lse or call.table else call.dense_heads
    if len(dense) == call.heads:
        return Route(None, dense=dense, declined=tuple(declined))
    return Route(kernel, _text(call, kernel), dense, tuple(declined))


def _text(call: Call, kernel: str) -> Optional[str]:
    """Who takes the text query rows beside the CUDA kernel's video launch."""
    if kernel in ("triton", "torch") or not call.q_text:
        return None
    return "sdpa" if call.text_dense else "triton"


def route(call: Call, device: Device, backend: str = "auto") -> Route:
    """The kernels that run ``call`` on ``device``, forward and backward. ``backend="auto"``
    takes the fastest that can; a kernel's name asks for it and raises ``ValueError`` with
    its reason if it cannot. Off a GPU ``auto`` takes the torch backend (the Triton
    interpreter is for tests)."""
    r = _forward_route(call, device, backend)
    kernel, declined = backward_route(call, device, backend)
    return dataclasses.replace(r, backward=kernel, backward_declined=declined)


def backward_route(call: Call, device: Device, backend: str = "auto") -> tuple[str, tuple[tuple[str, str], ...]]:
    """The backward's kernel and each faster one declined, with why: the CUDA backward
    where it can (``auto`` or ``cuda``), else Triton; ``backend="torch"`` and ``auto`` off
    a GPU take the torch backward."""
    if backend == "torch":
        return "torch", ()
    declined = []
    if backend in ("auto", "cuda"):
        reason = cuda_backward_rule(call, device)
        if reason is None:
            return "cuda", ()
        declined.append(("cuda", reason))
    if device.type != "cuda" and backend == "auto":
        declined.append(("triton", device.triton or "off a GPU auto takes the torch backend (the interpreter is for tests)"))
        return "torch", tuple(declined)
    reason = triton_rule(call, device)
    if reason is None:
        return "triton", tuple(declined)
    return "torch", tuple(declined + [("triton", reason)])
