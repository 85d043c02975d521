"""Collectives with a byte count and clear failures.

Every collective goes through :class:`Comm`, which counts the bytes this rank sends to
other ranks (per step name) and turns a backend failure (dead peer, timeout) into a
:class:`CollectiveError` that names the step, the ranks and the likely cause.
"""

from __future__ import annotations

import collections
import hashlib
import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed: a peer died, timed out, or the ranks disagree."""


class Comm:
    """The process group of one distributed attention, and its sub-groups.

    ``groups`` maps a tuple of global ranks to a process group; sub-groups must be created
    collectively (every rank, same order) before use: see :meth:`make_groups`.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.bytes_sent: collections.Counter = collections.Counter()
        self.check_calls = True
        """Whether each call's agreement is checked (:meth:`check_agreement`); the benchmark
        turns it off once to measure what the check costs."""
        self._pending: list = []
        """Checks started with ``defer`` and not yet settled."""
        self._unposted: list = []
        """Checks deferred and not yet started: ``(what, description)``."""
        if not dist.is_initialized():
            if group is not None:
                raise RuntimeError("torch.distributed is not initialized: call sta_dist.init_distributed() first")
            # One process without a process group: every group is this rank alone.
            self.group, self.rank, self.world_size, self.global_ranks, self.backend = None, 0, 1, (0,), "none"
            self.groups: dict = {(0,): None}
            return
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.global_ranks = tuple(dist.get_global_rank(self.group, r) for r in range(self.world_size))
        self.backend = dist.get_backend(self.group)
        self.groups = {tuple(range(self.world_size)): self.group}
        self._overlap_groups: dict = {}
        # The per-call agreement check runs on the host, over gloo, so it never waits for
        # the GPU: while the CPU is ahead of the device it costs no device time.
        if self.backend in ("gloo", "fake"):
            self.meta_group = self.group
        else:
            self.meta_group = dist.new_group(list(self.global_ranks), backend="gloo")

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def make_groups(self, rank_sets: Sequence[tuple[int, ...]]) -> None:
        """Create sub-groups (ranks local to this Comm's group). Collective: every rank
        must call it with the same sets in the same order."""
        for ranks in rank_sets:
            key = tuple(ranks)
            if key in self.groups or len(key) == 1:
                continue
            pg = dist.new_group([self.global_ranks[r] for r in key])
            self.groups[key] = pg

    def _overlap_group(self, ranks: tuple[int, ...]) -> dist.ProcessGroup:
        """Over NCCL, the twin of the group of ``ranks`` whose kernels run on a high-priority
        stream: an exchange meant to run beside the attention gets multiprocessors as the
        attention's blocks retire, instead of after all of them (on 2 H100s, a head-mode
        layer in 3 chunks: 14.9 ms against 16.4 without it). Made on first use, which is
        collective: every member gets there in the same call of the same schedule."""
        group = self._group(ranks)
        if self.backend != "nccl":
            return group
        if ranks not in self._overlap_groups:
            options = dist.ProcessGroupNCCL.Options()
            options.is_high_priority_stream = True
            self._overlap_groups[ranks] = dist.new_group([self.global_ranks[r] for r in ranks], pg_options=options,
                                                         use_local_synchronization=True)
        return self._overlap_groups[ranks]

    def _group(self, ranks: tuple[int, ...]) -> dist.ProcessGroup:
        if ranks not in self.groups:
            raise RuntimeError(f"no process group for ranks {ranks}: make_groups() was not called for it")
        return self.groups[ranks]

    def _fail(self, step: str, ranks, err: Exception) -> CollectiveError:
        return CollectiveError(
            f"rank {self.rank}: collective '{step}' over ranks {list(ranks)} failed: a peer died, timed out, "
            f"or the ranks disagree on the call ({type(err).__name__}: {err})"
        )

    # -- collectives ---------------------------------------------------------------------
    def all_to_all(self, step: str, ranks: tuple[int, ...], send: Sequence[Sequence[torch.Tensor]],
                   recv_numels: Sequence[int]) -> list[torch.Tensor]:
        """Send the tensors ``send[i]`` (any shapes, packed back to back) to ``ranks[i]``;
        receive ``recv_numels[i]`` elements from ``ranks[i]``, returned flat. Each tensor
        is copied once, into the send buffer; one ``all_to_all_single`` with uneven splits."""
        return self.all_to_all_start(step, ranks, send, recv_numels).wait()

    def all_to_all_start(self, step: str, ranks: tuple[int, ...], send: Sequence[Sequence[torch.Tensor]],
                         recv_numels: Sequence[int], out: Optional[torch.Tensor] = None,
                         overlap: bool = False) -> "Exchange":
        """:meth:`all_to_all` started and left running (on the GPU, on the backend's own
        stream, after what the current stream enqueued so far); :meth:`Exchange.wait` gives
        the received chunks. ``out``: a contiguous buffer of ``sum(recv_numels)`` elements
        to receive into (else a new one). Tensors that already lie back to back in one
        buffer, in ``send`` order, are sent from it without the copy. ``overlap``: the
        exchange runs beside compute, on the group's high-priority twin where there is one."""
        self._post_deferred()
        me = ranks.index(self.rank)
        sizes = [sum(t.numel() for t in parts) for parts in send]
        flat = _back_to_back([t for parts in send for t in parts if t.numel()])
        if flat is None:
            first = next(t for parts in send for t in parts)
            flat = first.new_empty(sum(sizes))
            offset = 0
            for parts in send:
                for t in parts:
                    flat[offset:offset + t.numel()].view(t.shape).copy_(t)
                    offset += t.numel()
        if len(ranks) == 1:
            if out is not None:
                out.copy_(flat)
            return Exchange(self, step, ranks, None, [flat if out is None else out])
        if out is None:
            out = flat.new_empty(sum(recv_numels))
        try:
            group = self._overlap_group(ranks) if overlap else self._group(ranks)
            work = dist.all_to_all_single(out, flat, output_split_sizes=list(recv_numels), input_split_sizes=sizes,
                                          group=group, async_op=True)
        except Exception as err:  # noqa: BLE001 - every backend error becomes one clear error
            raise self._fail(step, ranks, err) from err
        self.bytes_sent[step] += sum(n for i, n in enumerate(sizes) if i != me) * flat.element_size()
        return Exchange(self, step, ranks, work, list(out.split(list(recv_numels))))

    def all_gather(self, step: str, ranks: tuple[int, ...], x: torch.Tensor,
                   overlap: bool = False) -> list[torch.Tensor]:
        """Every member's ``x`` (same shape everywhere), in ``ranks`` order. ``overlap``: as
        :meth:`all_to_all_start` (beside compute, on the high-priority twin group)."""
        self._post_deferred()
        if len(ranks) == 1:
            return [x]
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in ranks]
        try:
            dist.all_gather(out, x, group=self._overlap_group(ranks) if overlap else self._group(ranks))
        except Exception as err:  # noqa: BLE001
            raise self._fail(step, ranks, err) from err
        self.bytes_sent[step] += x.numel() * x.element_size() * (len(ranks) - 1)
        return out

    def check_agreement(self, what: str, description: str, defer: bool = False) -> None:
        """Raise on every rank if the ranks' ``description`` strings differ, naming them.

        One all-gather of an 8-byte digest over the host (gloo) group; the descriptions
        themselves travel only when the digests differ. With ``defer`` the all-gather is
        started and left to run beside what the caller enqueues next (the GPU exchanges of
        the call), and :meth:`settle_agreements` waits for it and raises: on an H100 pair a
        blocking check cost 2-4% of a 16 ms layer, 8-10% of a 10 ms one on four. A deferred
        check is posted with the next collective started (or when settled), so the host
        hands the GPU a call's first launch without waiting for it."""
        if self.world_size == 1 or self.backend == "fake" or not self.check_calls:  # fake: shapes only
            return
        self.settle_agreements()
        if defer:
            self._unposted.append((what, description))
            return
        self._post(what, description, defer=False)
        self.settle_agreements()

    def _post(self, what: str, description: str, defer: bool) -> None:
        digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:7], "little")
        mine = torch.tensor([digest], dtype=torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        try:
            work = dist.all_gather(everyone, mine, group=self.meta_group, async_op=defer)
        except Exception as err:  # noqa: BLE001
            raise self._fail(f"check {what}", range(self.world_size), err) from err
        self._pending.append((what, description, digest, everyone, work))

    def _post_deferred(self) -> None:
        """Start the deferred checks not started yet."""
        while self._unposted:
            self._post(*self._unposted.pop(0), defer=True)

    def settle_agreements(self) -> None:
        """Wait for the checks :meth:`check_agreement` left running; raise on every rank if
        the ranks disagreed in one of them."""
        self._post_deferred()
        while self._pending:
            what, description, digest, everyone, work = self._pending.pop(0)
            try:
                if work is not None:
                    work.wait()
            except Exception as err:  # noqa: BLE001
                self._pending.clear()
                raise self._fail(f"check {what}", range(self.world_size), err) from err
            if all(int(d) == digest for d in everyone):
                continue
            self._pending.clear()  # every rank gets here for the same check: the gather below matches
            descriptions: list = [None] * self.world_size
            try:
                dist.all_gather_object(descriptions, description, group=self.meta_group)
            except Exception as err:  # noqa: BLE001
                raise self._fail(f"check {what}", range(self.world_size), err) from err
            lines = "; ".join(f"rank {r}: {d}" for r, d in enumerate(descriptions))
            raise ValueError(f"ranks disagree on {what}: {lines}")


class Exchange:
    """An exchange :meth:`Comm.all_to_all_start` left running."""

    def __init__(self, comm: Comm, step: str, ranks, work, chunks: list[torch.Tensor]):
        self._comm, self._step, self._ranks, self._work, self._chunks = comm, step, ranks, work, chunks

    def wait(self) -> list[torch.Tensor]:
        """The received chunks, in ``ranks`` order. On the GPU the current stream waits for
        them, the host does not."""
        if self._work is not None:
            try:
                self._work.wait()
            except Exception as err:  # noqa: BLE001
                raise self._comm._fail(self._step, self._ranks, err) from err
            self._work = None
        return self._chunks


def _back_to_back(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """One flat view of ``tensors`` if they are contiguous and follow each other in one
    buffer, in this order (e.g. consecutive row ranges of one tensor), else ``None``."""
    if not tensors or not all(t.is_contiguous() for t in tensors):
        return None
    base = tensors[0]
    storage, end = base.untyped_storage().data_ptr(), base.data_ptr()
    for t in tensors:
        if (t.data_ptr() != end or t.untyped_storage().data_ptr() != storage or t.dtype != base.dtype
                or t.device != base.device):
            return None
        end += t.numel() * t.element_size()
    total = sum(t.numel() for t in tensors)
    return torch.as_strided(base, (total,), (1,), base.storage_offset()) if total else None


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
