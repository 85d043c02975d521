"""One distributed STA call: the executor every distributed caller runs.

:func:`run` is the call; :class:`DistributedSlidingTileAttention`, the seed API's Impl
(``run_planned`` and its three hooks) and the FastVideo and diffusers adapters call it
or its stages. On every rank, in order:

1. **check** (:func:`check_call`): this rank's inputs, then that every rank makes the
   same call (one digest; a rank's bad input fails every rank at once);
2. **parts**: the cost model's split of the call's heads (:func:`~sta_dist.parallel.decide.call_parts`),
   each part with its schedule;
3. **head exchange in**: tokens for heads over the head group, in ``head_chunks`` chunks;
4. **own keys**: every query of the box over the box's own keys and the text;
5. **remote keys**: the key source, the window's halo or the selected tiles fetched
   (:mod:`~sta_dist.parallel.selected`), exchanged over the tile group and folded into
   step 4's rows by the log-sum-exp;
6. **text merge**: the text rows' exact merge over the tile group;
7. **exchange out**: the inverse all-to-all to the caller's tokens.

``overlap=True`` (the default) runs the exchanges of steps 3 and 5 beside the attention;
``overlap=False`` is the staged order: each exchange is waited for before the attention
that reads it. Both run the same launches on the same rows, so on gloo they agree bit for
bit (a test holds them to it); the seed API's hooks run the staged order split at
``preprocess_qkv`` / ``forward`` / ``postprocess_output``.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``; a rank's local tensors hold its
video tokens, then all ``L`` text tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from ..config import normalize_windows
from ..dispatch import choose_backend, local_attention
from ..geometry import Triple
from ..local import Halo, LocalText, head_index, longest_text, sample_groups
from ..selection.tables import KeyTiles
from ..validation import check_qkv, check_text_length
from . import selected
from .adjoint import halo_back, heads_back, sum_over
from .comm import Comm
from .decide import call_parts, call_schedule, warn_if_fallback
from .plan import ShardPlan
from .runtime import (BoxInputs, PartialOutput, attend, exchange_out, fork, halo_exchange, head_exchange, merge_text,
                      start_halo, start_head_exchange, start_heads_in, start_out)
from .schedule import CallSchedule, head_chunk, key_split


@dataclass(frozen=True)
class Attention:
    """The attention a distributed call computes, the same on every rank."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    backend: str = "auto"


@dataclass(frozen=True)
class CallRequest:
    """One call, checked on this rank and agreed on by every rank."""

    windows: Optional[tuple[Triple, ...]]
    """One window per query head (sta_dist's rule), or ``None`` (selection alone)."""
    text_length: object
    """One int, or a tuple of one per batch sample."""
    select: object = None
    """``None`` (the window alone), a :class:`~sta_dist.selection.TopK` / ``Mass``, or a bool tile mask."""
    window_rule: str = "sta"

    @property
    def selects(self) -> bool:
        """Whether the call's keys are lists (a selection, or windows of another rule)."""
        return self.select is not None or self.windows is None or self.window_rule != "sta"


def check_local(q, k, v, attn: Attention, plan: ShardPlan, rank: int) -> None:
    """``q, k, v`` against the call's head counts and head size and ``rank``'s share of the plan."""
    _, S, H, Hkv, D = check_qkv(q, k, v)
    if (H, Hkv, D) != (attn.num_heads, attn.num_kv_heads, attn.head_size):
        raise ValueError(
            f"q/k/v must have num_heads={attn.num_heads}, num_kv_heads={attn.num_kv_heads} and "
            f"head_size={attn.head_size} (the Impl's), got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
        )
    expected = plan.held_count(rank) + plan.text_len
    if S != expected:
        raise ValueError(
            f"rank {rank}'s q/k/v must be [B, {expected}, H, D]: its "
            f"{plan.held_count(rank)} video tokens plus {plan.text_len} text, "
            f"got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
        )


def check_call(q, k, v, attn: Attention, plan: ShardPlan, comm: Comm, windows: Callable[[], object],
               text_length, select=None, window_rule: str = "sta") -> CallRequest:
    """Step 1: this rank's inputs, then that every rank makes the same call (windows, text
    length, selection, batch, dtype): otherwise the exchanges would silently mix different
    problems. One 8-byte digest per call; a rank whose inputs are invalid makes every rank
    fail at once, instead of leaving its peers waiting in the next collective. ``windows``
    gives the call's windows (one per query head, or one for all, or ``None``) when called:
    its errors are this rank's too. Over NCCL the agreement is settled beside the call's
    first GPU work (:meth:`Comm.settle_agreements`, which :func:`run` calls before it returns)."""
    from ..selection.config import check_select, check_window_or_select, check_window_rule, describe

    try:
        check_local(q, k, v, attn, plan, comm.rank)
        B = q.shape[0]
        text_length = check_text_length(text_length, plan.text_len, B)
        window = windows()
        window_rule = check_window_rule(window_rule)
        if select is not None or window is None or window_rule != "sta":
            check_window_or_select(window, select)
            select = check_select(select, B, attn.num_heads, plan.config.num_tiles, q.device)
        request = CallRequest(None if window is None else normalize_windows(window, attn.num_heads), text_length,
                              select, window_rule)
        description = (f"windows={request.windows} text_length={text_length} batch={B} dtype={q.dtype} "
                       f"device={q.device.type}")
        if request.selects:
            description += f" {describe(select, window_rule)}"
        error = None
    except (ValueError, TypeError, IndexError) as err:
        description, error = f"invalid call ({type(err).__name__}: {err})", err
    # Over NCCL the check runs on the host beside the call's GPU exchanges and is settled before
    # any output is returned; on gloo the exchanges themselves run on the host, so it is settled
    # before them.
    comm.check_agreement("this call", description, defer=error is None and comm.backend == "nccl")
    if error is not None:
        raise error
    return request


def run(q, k, v, request: CallRequest, attn: Attention, plan: ShardPlan, comm: Comm, *, overlap: bool = True,
        parts=None, return_selection: bool = False):
    """Steps 2-7 of a checked call on this rank's local ``q, k, v``: the rank's output,
    all heads (with ``return_selection``, also the
    :class:`~sta_dist.parallel.selected.SelectionInfo`). ``parts``: a split of the heads
    of the caller's own (:class:`~sta_dist.parallel.decide.CallPart`, the same on every
    rank), default the cost model's."""
    if request.selects or return_selection:
        if needs_grad(q, k, v):
            found = []  # the SelectionInfo, not differentiable: beside the Function's output
            out = _SelectedCall.apply(q, k, v, request, attn, plan, comm, found)
            info = found[0]
        else:
            out, info = _run_selected(q, k, v, request, attn, plan, comm, overlap)
        comm.settle_agreements()  # a call the ranks disagreed on returns no output
        return (out, info) if return_selection else out
    if parts is None:
        parts = call_parts(plan, request.windows, attn.num_kv_heads, q.shape[0], q.shape[3], q.element_size(),
                           longest_text(request.text_length))
    if needs_grad(q, k, v):
        out = _Call.apply(q, k, v, request, attn, plan, comm, parts)
    elif len(parts) == 1:
        sched = call_schedule(plan, request.windows, attn.num_kv_heads, comm.rank, parts[0].wide_tile)
        out = _run_schedule(q, k, v, sched, request.text_length, attn, comm, overlap, attn.num_heads, plan)
    else:
        out = torch.empty_like(q)
        for part in parts:
            qi, kvi = head_index(part.q_heads, q.device), head_index(part.kv_heads, q.device)
            local = (q[:, :, qi].contiguous(), k[:, :, kvi].contiguous(), v[:, :, kvi].contiguous())
            out[:, :, qi] = _run_schedule(*local, part.schedule(plan, comm.rank), request.text_length, attn, comm,
                                          overlap, len(part.q_heads), plan)
    comm.settle_agreements()  # a call the ranks disagreed on returns no output
    return out


def _run_schedule(q, k, v, sched: CallSchedule, text_length, attn: Attention, comm: Comm, overlap: bool,
                  num_heads: int, plan: ShardPlan) -> torch.Tensor:
    """One schedule's call: head mode (tile group of one) in chunks of heads, else the box's
    own keys and the halo folded in."""
    warn_if_fallback(sched, plan)
    if len(sched.tile_group) == 1:
        return _head_call(q, k, v, sched, comm, text_length, attn, num_heads, overlap)
    box = head_exchange(q, k, v, sched, comm)
    return exchange_out(_tile_attend(box, sched, comm, text_length, attn, overlap), sched, comm, num_heads)


def _head_call(q_bshd, k_bshd, v_bshd, sched: CallSchedule, comm: Comm, text_length, attn: Attention,
               num_heads: int, overlap: bool) -> torch.Tensor:
    """Steps 3, 4 and 7 in head mode, in ``sched.head_chunks`` chunks of heads: overlapped,
    every chunk's all-to-all starts at once, each chunk is attended as soon as its tokens
    are in and its output goes back while the next is attended (with one sample received
    into and sent from the kernel's tensors as they lie); staged, each chunk's exchange is
    waited for before its attention and its output's before the next chunk."""
    chunks = [head_chunk(sched, c) for c in range(sched.head_chunks)]
    start = lambda ch: start_head_exchange(q_bshd, k_bshd, v_bshd, ch, comm, overlap=overlap)  # noqa: E731
    inbound = [start(ch) for ch in chunks] if overlap else None
    outbound = []
    for c, ch in enumerate(chunks):
        box, exchanges = inbound[c] if overlap else start(ch)
        for x in exchanges:
            x.wait()
        out = attend(box, ch, text_length, attn.scale, attn.backend).out_bshd if ch.heads.windows else box.q_bshd
        outbound.append(start_out(out, ch, comm, overlap))
        if not overlap:
            outbound[-1] = tuple(_Done(x.wait()) for x in outbound[-1])
    B, D = q_bshd.shape[0], q_bshd.shape[3]
    n_held = q_bshd.shape[1] - sched.layout.q_text
    result = q_bshd.new_empty(B, q_bshd.shape[1], num_heads, D)
    for ch, (video, text) in zip(chunks, outbound):
        for qh, part, txt in zip(ch.q_heads, video.wait(), text.wait()):
            if qh:
                idx = head_index(qh, result.device)
                result[:, :n_held, idx] = part.view(B, n_held, len(qh), D)
                result[:, n_held:, idx] = txt.view(B, -1, len(qh), D)
    return result


class _Done:
    """An exchange already waited for (the staged order)."""

    def __init__(self, result):
        self.result = result

    def wait(self):
        return self.result


def _tile_attend(box: BoxInputs, sched: CallSchedule, comm: Comm, text_length, attn: Attention,
                 overlap: bool) -> PartialOutput:
    """Steps 4 and 5 in a tile group: every query of the box over the box's keys and the
    text, then the query tiles whose windows reach a neighbour's box over the halo from it,
    folded in by the log-sum-exp (:func:`~sta_dist.parallel.schedule.key_split`). The halo
    is received into tensors of its own, which the CUDA kernel reads where they lie.
    Overlapped, the host enqueues the box's launch first, so the GPU starts it at once, and
    the halo's rows are gathered and sent on a side stream beside it; staged, the halo is
    waited for before. Per-sample text lengths: the launches per group of samples with one
    length."""
    side = fork(box.k_bshd.device) if overlap else None  # after what came before this call, beside the launch
    halo = None if overlap else _start_halo(box, sched, comm, None)()
    text = LocalText.per_sample(text_length, kv_for_text_q=sched.counts_text_keys)
    groups = [(text, None)] if isinstance(text, LocalText) else sample_groups(text)
    own = []
    for group_text, idx in groups:
        part = box if idx is None else BoxInputs(*(x[idx] for x in box))
        own.append((idx, part, *_own_keys(part, sched, group_text, attn)))
    if overlap:  # every member takes part in the exchange, needed or not
        halo = _start_halo(box, sched, comm, side)()
    for idx, part, out, lse in own:
        _fold_halo(part, sched, attn, out, lse, halo if idx is None else Halo(halo.k[idx], halo.v[idx], halo.first_row))
    return _joined_partial(own, box, sched, text_length)


def _start_halo(box: BoxInputs, sched: CallSchedule, comm: Comm, side) -> Callable[[], Halo]:
    """The halo exchange of k and v started (:func:`~sta_dist.parallel.runtime.start_halo`);
    returns the wait, which gives the :class:`~sta_dist.local.Halo`."""
    waits = [start_halo(x, sched, comm, side) for x in (box.k_bshd, box.v_bshd)]
    return lambda: Halo(*(wait() for wait in waits), sched.box_tokens)


def _joined(own: list, box: BoxInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups' ``(idx, inputs, out, lse)`` as one ``(out, lse)`` of the whole batch."""
    if len(own) == 1:
        return own[0][2], own[0][3]
    B, S, H, _ = box.q_bshd.shape
    out = torch.empty_like(box.q_bshd)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=out.device)
    for idx, _, o, l in own:
        out[idx], lse[idx] = o, l
    return out, lse


def _joined_partial(own: list, box: BoxInputs, sched: CallSchedule, text_length) -> PartialOutput:
    """:func:`_joined` as a partial output (the text rows' log-sum-exp kept where they are merged)."""
    out, lse = _joined(own, box)
    merge = longest_text(text_length) > 0
    return PartialOutput(out, lse[:, :, sched.box_tokens:] if merge else None)


def _own_keys(box: BoxInputs, sched: CallSchedule, text: LocalText, attn: Attention, joined_halo: int = 0):
    """Step 4: ``(out, lse)`` of every query of the box over the box's own keys and the
    text. ``joined_halo``: k/v hold that many halo rows between the box and the text (the
    hooks' joined inputs); they are not read."""
    own = key_split(sched).own
    if joined_halo:
        own = dataclasses.replace(own, kv_video=own.kv_video + joined_halo)
    return local_attention(*box, own, sched.heads, text, attn.scale, attn.backend, return_lse=True)


def _fold_halo(box: BoxInputs, sched: CallSchedule, attn: Attention, out, lse, halo: Optional[Halo]) -> None:
    """Step 5 for the window's halo: each neighbour's part folded into ``out``/``lse``.
    ``halo=None``: k/v hold it joined, after the box."""
    for part in key_split(sched).halo:
        if part.q_tiles:
            local_attention(*box, part, sched.heads, LocalText(0, 0, 0), attn.scale, attn.backend, out=out, lse=lse,
                            resume=True, halo=halo)


# -- the staged order split at the seed API's three hooks ---------------------------------

def hooks_schedule(plan: ShardPlan, windows: tuple[Triple, ...], num_kv_heads: int, rank: int, x_bshd: torch.Tensor,
                   text_length) -> CallSchedule:
    """The one schedule the three hooks run: the cost model's, where it runs the call in one
    part; a call it splits into parts (heads through the head all-to-all beside heads in
    tile mode) runs whole in the plan's schedule, as the hooks pass one box between them."""
    parts = call_parts(plan, windows, num_kv_heads, x_bshd.shape[0], x_bshd.shape[3], x_bshd.element_size(),
                       longest_text(text_length))
    return call_schedule(plan, windows, num_kv_heads, rank, len(parts) == 1 and parts[0].wide_tile)


def stage_in(q, k, v, sched: CallSchedule, comm: Comm) -> BoxInputs:
    """``preprocess_qkv``: steps 3 and 5's exchange, waited for: the box inputs with the halo
    joined after the box's keys (before the text)."""
    return halo_exchange(head_exchange(q, k, v, sched, comm), sched, comm)


def stage_attend(inputs: BoxInputs, sched: CallSchedule, text_length, attn: Attention) -> PartialOutput:
    """``forward``: steps 4 and 5's launches on :func:`stage_in`'s inputs, the same launches
    on the same rows as :func:`run`."""
    if len(sched.tile_group) == 1:
        return attend(inputs, sched, text_length, attn.scale, attn.backend)
    out, lse = _joined_launches(inputs, sched, text_length, attn)
    merge = longest_text(text_length) > 0
    return PartialOutput(out, lse[:, :, sched.box_tokens:] if merge else None)


def _joined_launches(inputs: BoxInputs, sched: CallSchedule, text_length, attn: Attention):
    """Steps 4 and 5's launches on inputs with the halo joined after the box's keys (per
    group of samples with one text length): ``(out, lse)`` of every row of the box."""
    n_halo = inputs.k_bshd.shape[1] - inputs.q_bshd.shape[1]
    text = LocalText.per_sample(text_length, kv_for_text_q=sched.counts_text_keys)
    groups = [(text, None)] if isinstance(text, LocalText) else sample_groups(text)
    own = []
    for group_text, idx in groups:
        part = inputs if idx is None else BoxInputs(*(x[idx] for x in inputs))
        out, lse = _own_keys(part, sched, group_text, attn, joined_halo=n_halo)
        _fold_halo(part, sched, attn, out, lse, None)
        own.append((idx, part, out, lse))
    return _joined(own, inputs)


def stage_out(partial: PartialOutput, sched: CallSchedule, comm: Comm, num_heads: int) -> torch.Tensor:
    """``postprocess_output``: steps 6 and 7."""
    return exchange_out(partial, sched, comm, num_heads)


# -- selected tiles: the key source is the fetch -------------------------------------------

def _run_selected(q, k, v, request: CallRequest, attn: Attention, plan: ShardPlan, comm: Comm, overlap: bool):
    """Steps 3-7 with selected tiles: ``(output, SelectionInfo)``."""
    from ..selection.attention import table_heads

    heads = table_heads(request.windows, request.window_rule, attn.num_heads, plan.grid, attn.num_kv_heads)
    sched = call_schedule(plan, heads.windows, attn.num_kv_heads, comm.rank)
    warn_if_fallback(sched, plan)
    box = head_exchange(q, k, v, sched, comm)
    partial, call_sched, info = selected.attend_selected(box, sched, plan, comm, select=request.select, windows=request.windows,
                                         window_rule=request.window_rule, num_heads=attn.num_heads,
                                         num_kv_heads=attn.num_kv_heads, text_length=request.text_length,
                                         scale=attn.scale, backend=attn.backend,
                                         use_triton=choose_backend(q, attn.backend) == "triton", overlap=overlap)
    return exchange_out(partial, call_sched, comm, attn.num_heads), info


# -- training: the call as one autograd Function ---------------------------------------------

def needs_grad(*xs: torch.Tensor) -> bool:
    """Whether a call records its backward: grad mode on and some input requiring grad."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


class _Saved(NamedTuple):
    """What one schedule's backward needs: the box inputs with the halo kept (joined after
    the box's keys), the final output and log-sum-exp of the box's rows (text rows merged);
    a selected call's lists (its schedule's halo is the fetched tiles)."""

    sched: CallSchedule
    inputs: BoxInputs
    out_bshd: torch.Tensor
    lse_bhs: torch.Tensor
    keys: Optional[KeyTiles] = None


def _train_forward(q, k, v, sched: CallSchedule, text_length, attn: Attention, comm: Comm,
                   num_heads: int) -> tuple[torch.Tensor, _Saved]:
    """One schedule's call in the staged order, keeping what its backward reads."""
    inputs = stage_in(q, k, v, sched, comm)
    text = LocalText.per_sample(text_length, kv_for_text_q=sched.counts_text_keys)
    if len(sched.tile_group) == 1:
        out, lse = local_attention(*inputs, sched.layout, sched.heads, text, attn.scale, attn.backend,
                                   return_lse=True)
    else:
        out, lse = _joined_launches(inputs, sched, text_length, attn)
        if longest_text(text_length) > 0:
            text_lse = lse[:, :, sched.box_tokens:]
            merge_text(out, text_lse, sched, comm, lse_out=text_lse)
    local = exchange_out(PartialOutput(out, None), sched, comm, num_heads)
    return local, _Saved(sched, inputs, out, lse)


def _train_backward(dout_local: torch.Tensor, saved: _Saved, text_length, attn: Attention, comm: Comm,
                    num_heads: int, num_kv_heads: int):
    """One schedule's ``(dq, dk, dv)`` in the rank's tokens (every head; text rows whole)."""
    from ..backward import local_backward

    sched, inputs = saved.sched, saved.inputs
    dout_box = _heads_in(dout_local, sched.q_heads, sched, comm)
    text = LocalText.per_sample(text_length, kv_for_text_q=sched.counts_text_keys)
    dq, dk, dv = local_backward(*inputs, saved.out_bshd, saved.lse_bhs, dout_box, sched.layout, sched.heads, text,
                                attn.scale, attn.backend, keys=saved.keys)
    n_box = sched.box_tokens
    if len(sched.tile_group) > 1:
        if longest_text(text_length) > 0:  # the text queries' partial sums over each member's keys
            dq[:, n_box:] = sum_over(dq[:, n_box:], sched.tile_group, comm, "text grad merge")
        dk, dv = (halo_back(x, sched, comm) for x in (dk, dv))
        if dk.shape[1] > n_box:  # every member's queries read the text keys
            for x in (dk, dv):
                x[:, n_box:] = sum_over(x[:, n_box:], sched.tile_group, comm, "text grad merge")
    return (heads_back(dq, sched.q_heads, sched, comm, num_heads),
            heads_back(dk, sched.kv_heads, sched, comm, num_kv_heads),
            heads_back(dv, sched.kv_heads, sched, comm, num_kv_heads))


def _heads_in(x_bshd: torch.Tensor, heads_of, sched: CallSchedule, comm: Comm) -> torch.Tensor:
    """The head all-to-all of one tensor (the forward's, for ``dout``): this member's heads
    of the whole box, then its heads of the (replicated) text rows."""
    box, exchanges = start_heads_in(x_bshd, heads_of, sched, comm)
    exchanges.wait()
    return box


class _Call(torch.autograd.Function):
    """A distributed window call whose backward runs the exchanges' adjoints
    (:mod:`~sta_dist.parallel.adjoint`) around the local backward
    (:func:`sta_dist.backward.local_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, request: CallRequest, attn: Attention, plan: ShardPlan, comm: Comm, parts):
        ctx.request, ctx.attn, ctx.comm, ctx.parts = request, attn, comm, parts
        if len(parts) == 1:
            sched = call_schedule(plan, request.windows, attn.num_kv_heads, comm.rank, parts[0].wide_tile)
            warn_if_fallback(sched, plan)
            out, saved = _train_forward(q, k, v, sched, request.text_length, attn, comm, attn.num_heads)
            ctx.saved = [saved]
            return out
        out = torch.empty_like(q)
        ctx.saved = []
        for part in parts:
            qi, kvi = head_index(part.q_heads, q.device), head_index(part.kv_heads, q.device)
            local = (q[:, :, qi].contiguous(), k[:, :, kvi].contiguous(), v[:, :, kvi].contiguous())
            out[:, :, qi], saved = _train_forward(*local, part.schedule(plan, comm.rank), request.text_length, attn,
                                                  comm, len(part.q_heads))
            ctx.saved.append(saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        request, attn, comm = ctx.request, ctx.attn, ctx.comm
        dout = dout.contiguous()
        if len(ctx.parts) == 1:
            grads = _train_backward(dout, ctx.saved[0], request.text_length, attn, comm, attn.num_heads,
                                    attn.num_kv_heads)
        else:
            B, S, _, D = dout.shape
            grads = (dout.new_zeros(B, S, attn.num_heads, D), dout.new_zeros(B, S, attn.num_kv_heads, D),
                     dout.new_zeros(B, S, attn.num_kv_heads, D))
            for part, saved in zip(ctx.parts, ctx.saved):
                qi, kvi = head_index(part.q_heads, dout.device), head_index(part.kv_heads, dout.device)
                dq, dk, dv = _train_backward(dout[:, :, qi].contiguous(), saved, request.text_length, attn, comm,
                                             len(part.q_heads), len(part.kv_heads))
                grads[0][:, :, qi], grads[1][:, :, kvi], grads[2][:, :, kvi] = dq, dk, dv
        ctx.saved = None
        return (*grads, None, None, None, None, None)


def _selected_train_forward(q, k, v, request: CallRequest, attn: Attention, plan: ShardPlan,
                            comm: Comm) -> tuple[torch.Tensor, _Saved, "selected.SelectionInfo"]:
    """A selected call in series, keeping what its backward reads: the head exchange, the
    selection and the fetch (:func:`~sta_dist.parallel.selected.fetch_selected`), one
    launch over the whole lists, the text rows merged (their merged log-sum-exp kept), the
    output all-to-all."""
    from ..selection.attention import table_heads

    heads = table_heads(request.windows, request.window_rule, attn.num_heads, plan.grid, attn.num_kv_heads)
    sched = call_schedule(plan, heads.windows, attn.num_kv_heads, comm.rank)
    warn_if_fallback(sched, plan)
    box = head_exchange(q, k, v, sched, comm)
    inputs, sched, keys, info = selected.fetch_selected(
        box, sched, plan, comm, select=request.select, windows=request.windows, window_rule=request.window_rule,
        num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
        use_triton=choose_backend(q, attn.backend) == "triton")
    text = LocalText.per_sample(request.text_length, kv_for_text_q=sched.counts_text_keys)
    out, lse = local_attention(*inputs, sched.layout, sched.heads, text, attn.scale, attn.backend, return_lse=True,
                               keys=keys)
    if len(sched.tile_group) > 1 and longest_text(request.text_length) > 0:
        text_lse = lse[:, :, sched.box_tokens:]
        merge_text(out, text_lse, sched, comm, lse_out=text_lse)
    local = exchange_out(PartialOutput(out, None), sched, comm, attn.num_heads)
    return local, _Saved(sched, inputs, out, lse, keys), info


class _SelectedCall(torch.autograd.Function):
    """A distributed call with selected tiles whose backward is the window call's
    (:func:`_train_backward`): the fetched tiles are its halo, so their gradients go back
    to their owners. The selection is a constant of the call, not differentiated."""

    @staticmethod
    def forward(ctx, q, k, v, request: CallRequest, attn: Attention, plan: ShardPlan, comm: Comm, found: list):
        out, ctx.saved, info = _selected_train_forward(q, k, v, request, attn, plan, comm)
        ctx.request, ctx.attn, ctx.comm = request, attn, comm
        found.append(info)
        return out

    @staticmethod
    def backward(ctx, dout):
        attn = ctx.attn
        grads = _train_backward(dout.contiguous(), ctx.saved, ctx.request.text_length, attn, ctx.comm,
                                attn.num_heads, attn.num_kv_heads)
        ctx.saved = None
        return (*grads, None, None, None, None, None)
