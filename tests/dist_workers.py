"""Functions that run on every rank of a spawned process group (importable by spawn)."""

from __future__ import annotations

import os
import time

import torch

from sta_dist import DistributedSlidingTileAttention, ShardPlan
from sta_dist.backend import SlidingTileAttentionMetadata
from sta_dist.config import normalize_windows
from sta_dist.local import longest_text
from sta_dist.parallel.decide import CallPart, call_mode, call_parts, call_schedule
from sta_dist.parallel.runtime import PartialOutput, exchange_in, exchange_out
from tests.cases import Case


def full_inputs(case: Case, seed: int):
    return case.tensors(torch.float32, seed=seed)


def run_cases(rank, world, cases, overlap=True):
    """Each (case, plan kwargs): the rank's local output, bytes sent per step, and mode;
    ``overlap=False``: the executor's staged order."""
    results = []
    for i, (case, plan_kw) in enumerate(cases):
        q, k, v = full_inputs(case, seed=i)
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        attn = DistributedSlidingTileAttention(case.heads, case.head_dim, plan, case.kv_heads)
        out = attn(plan.shard(q, rank), plan.shard(k, rank), plan.shard(v, rank), window=case.window,
                   text_length=case.text_length, overlap=overlap)
        mode = call_mode(plan, normalize_windows(case.window, case.heads), case.kv_heads, rank, case.batch,
                         case.head_dim, 4, longest_text(case.text_length))
        results.append((out, dict(attn.comm.bytes_sent), mode))
    return results


def run_in_parts(rank, world, cases):
    """Each (case, plan kwargs, groups of kv heads): the call run in those parts (the first
    through the plan's schedule for its windows, and so on), the rank's output and bytes."""
    results = []
    for i, (case, plan_kw, groups) in enumerate(cases):
        q, k, v = full_inputs(case, seed=i)
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        attn = DistributedSlidingTileAttention(case.heads, case.head_dim, plan, case.kv_heads)
        parts = kv_group_parts(case, groups)
        meta = SlidingTileAttentionMetadata(current_timestep=0, STA_param=[case.window], text_length=case.text_length)
        out = attn.impl.run_planned(plan.shard(q, rank), plan.shard(k, rank), plan.shard(v, rank), meta, parts=parts)
        results.append((out, dict(attn.comm.bytes_sent), [p.schedule(plan, rank).mode for p in parts]))
    return results


def kv_group_parts(case: Case, groups) -> tuple:
    """The :class:`CallPart` of each list of kv heads (with their query heads)."""
    windows = normalize_windows(case.window, case.heads)
    g = case.heads // case.kv_heads
    return tuple(CallPart(tuple(h for kv in kv_heads for h in range(kv * g, kv * g + g)), tuple(kv_heads),
                          tuple(windows[h] for kv in kv_heads for h in range(kv * g, kv * g + g)))
                 for kv_heads in groups)


def round_trip(rank, world, case, plan_kw):
    """exchange_in then exchange_out of the query part gives back the local q exactly."""
    q, k, v = full_inputs(case, seed=3)
    plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
    attn = DistributedSlidingTileAttention(case.heads, case.head_dim, plan, case.kv_heads)
    windows = tuple([tuple(case.window)] * case.heads)
    sched = call_schedule(plan, windows, case.kv_heads, rank)
    q_local = plan.shard(q, rank)
    box = exchange_in(q_local, plan.shard(k, rank), plan.shard(v, rank), sched, attn.comm)
    text_rows = box.q_bshd[:, sched.box_tokens:]
    back = exchange_out(PartialOutput(box.q_bshd, None), sched, attn.comm, case.heads)
    return torch.equal(back, q_local), tuple(text_rows.shape)


def disagreeing_plans(rank, world):
    tile = (2, 2, 2) if rank == 0 else (2, 2, 3)
    plan = ShardPlan(canvas=(4, 4, 6), tile=tile, text_len=0, mode="tile", world_size=world)
    DistributedSlidingTileAttention(2, 32, plan)
    return "constructed"


def dying_peer(rank, world):
    """Rank ``world - 1`` dies after the first call; the others keep calling."""
    case = Case((4, 6, 6), (2, 2, 2), (1, 1, 1), 0, 0, 1, 2, 2, 32)
    q, k, v = full_inputs(case, seed=0)
    plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=0, mode="tile", world_size=world)
    attn = DistributedSlidingTileAttention(2, 32, plan)
    local = [plan.shard(x, rank) for x in (q, k, v)]
    attn(*local, window=(1, 1, 1))
    if rank == world - 1:
        os._exit(3)
    start = time.monotonic()
    try:
        for _ in range(100):
            attn(*local, window=(1, 1, 1))
    except Exception as err:  # noqa: BLE001 - the test checks the message
        return f"{type(err).__name__} after {time.monotonic() - start:.1f}s: {err}"
    return "no error"


def fake_world(rank, world, case, plan_kw):
    """On the fake backend: one process plays rank FAKE_RANK of FAKE_WORLD_SIZE."""
    fake_rank, fake_world_size = int(os.environ["FAKE_RANK"]), int(os.environ["FAKE_WORLD_SIZE"])
    plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=fake_world_size, **plan_kw)
    attn = DistributedSlidingTileAttention(case.heads, case.head_dim, plan, case.kv_heads)
    n = plan.held_count(fake_rank) + case.text_len
    q = torch.randn(case.batch, n, case.heads, case.head_dim)
    k = torch.randn(case.batch, n, case.kv_heads, case.head_dim)
    out = attn(q, k, k.clone(), window=case.window)
    return tuple(out.shape), tuple(q.shape), plan.mode


def sleep_forever(rank, world):
    time.sleep(3600)


def dist_bench(rank, world, out_dir):
    """The 2-GPU benchmark's code path, on gloo with tiny shapes (the torch backend)."""
    from sta_dist.bench.dist import run_dist_bench

    result = run_dist_bench(out_dir, canvas=(4, 8, 8), tile=(2, 4, 4), window=(1, 1, 1), heads=4, head_dim=32,
                            text_len=5, text_valid=3, reps=2)
    return {name: row.get("max_diff_vs_one_gpu") for name, row in result["rows"].items()}


DISAGREEMENTS = (("text_length", "head"), ("text_length", "tile"), ("window", "head"), ("window", "tile"),
                 ("dtype", "tile"))


def disagreeing_calls(rank, world):
    """For each of DISAGREEMENTS, every rank makes one call and the last rank differs in
    ``what``. Returns each scenario's error text on this rank (or "no error")."""
    case = Case((4, 6, 6), (2, 2, 2), (1, 1, 1), 3, 3, 1, 2, 2, 32)
    q, k, v = full_inputs(case, seed=0)
    odd = rank == world - 1
    messages = {}
    for what, mode in DISAGREEMENTS:
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, mode=mode, world_size=world)
        attn = DistributedSlidingTileAttention(case.heads, case.head_dim, plan)
        local = [plan.shard(x, rank) for x in (q, k, v)]
        window = (2, 1, 1) if odd and what == "window" else (1, 1, 1)
        text_length = 2 if odd and what == "text_length" else 3
        if odd and what == "dtype":
            local = [x.half() for x in local]
        try:
            attn(*local, window=window, text_length=text_length)
            messages[(what, mode)] = "no error"
        except Exception as err:  # noqa: BLE001 - the test checks the message
            messages[(what, mode)] = f"{type(err).__name__}: {err}"
    return messages


def one_rank_invalid(rank, world):
    """The last rank passes a text length outside [0, L]: every rank must fail at once."""
    case = Case((4, 6, 6), (2, 2, 2), (1, 1, 1), 3, 3, 1, 2, 2, 32)
    q, k, v = full_inputs(case, seed=0)
    plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, mode="tile", world_size=world)
    attn = DistributedSlidingTileAttention(case.heads, case.head_dim, plan)
    start = time.monotonic()
    try:
        attn(*[plan.shard(x, rank) for x in (q, k, v)], window=(1, 1, 1), text_length=9 if rank == world - 1 else 3)
    except Exception as err:  # noqa: BLE001 - the test checks the message
        return time.monotonic() - start, f"{type(err).__name__}: {err}"
    return time.monotonic() - start, "no error"


def run_selected(rank, world, cases):
    """Each (case, window, select, window_rule, plan kwargs, seed): the rank's local output,
    its SelectionInfo, the bytes it sent per step, and the call's mode."""
    from sta_dist.parallel.decide import call_schedule as schedule_of
    from sta_dist.selection.attention import table_heads

    results = []
    for case, window, select, rule, plan_kw, seed in cases:
        q, k, v = full_inputs(case, seed=seed)
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        attn = DistributedSlidingTileAttention(case.heads, case.head_dim, plan, case.kv_heads)
        out, info = attn(plan.shard(q, rank), plan.shard(k, rank), plan.shard(v, rank), window=window,
                         text_length=case.text_length, select=select, window_rule=rule, return_selection=True)
        windows = None if window is None else normalize_windows(window, case.heads)
        heads = table_heads(windows, rule, case.heads, plan.grid, case.kv_heads)
        mode = schedule_of(plan, heads.windows, case.kv_heads, rank).mode
        results.append((out, info, dict(attn.comm.bytes_sent), mode))
    return results


def dist_bench_selected(rank, world, out_dir):
    """The 2-GPU selection benchmark's code path, on gloo with tiny shapes."""
    import sta_dist
    from sta_dist.bench.dist import run_dist_bench

    result = run_dist_bench(out_dir, canvas=(4, 8, 8), tile=(2, 4, 4), window=(1, 1, 1), heads=4, head_dim=32,
                            text_len=5, text_valid=3, reps=2, modes=("tile", "head"), select=sta_dist.TopK(2))
    return {name: row.get("max_diff_vs_one_gpu") for name, row in result["rows"].items()}, result["one_gpu_check"]


def deferred_disagreement(rank, world):
    """A deferred agreement check (the NCCL path's) settled later: the last rank differs."""
    from sta_dist.parallel.comm import Comm

    comm = Comm()
    comm.check_agreement("this call", "same", defer=True)
    comm.settle_agreements()  # agreed: nothing raised
    comm.check_agreement("this call", f"rank {rank}" if rank == world - 1 else "same", defer=True)
    try:
        comm.settle_agreements()
    except ValueError as err:
        return str(err)
    return "no error"


def forward_checks(rank, world, cases, order_cases):
    """:func:`run_cases` of ``cases`` and :func:`run_in_every_order` of ``order_cases``, in one
    spawn (a spawn costs more than its calls)."""
    return run_cases(rank, world, cases), run_in_every_order(rank, world, order_cases)


def run_in_every_order(rank, world, cases):
    """Each (case, plan kwargs, select): the rank's output in the executor's overlapped order,
    in its staged order, and through the seed API's three hooks (window calls the cost model
    runs in one part: the hooks pass one box between them)."""
    results = []
    for i, (case, plan_kw, select) in enumerate(cases):
        q, k, v = full_inputs(case, seed=i)
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        attn = DistributedSlidingTileAttention(case.heads, case.head_dim, plan, case.kv_heads)
        local = [plan.shard(x, rank) for x in (q, k, v)]
        orders = [attn(*local, window=case.window, text_length=case.text_length, select=select, overlap=overlap)
                  for overlap in (True, False)]
        windows = normalize_windows(case.window, case.heads)
        if select is None and len(call_parts(plan, windows, case.kv_heads, case.batch, case.head_dim, 4,
                                             longest_text(case.text_length))) == 1:
            meta = SlidingTileAttentionMetadata(current_timestep=0, STA_param=[case.window],
                                                text_length=case.text_length)
            impl = attn.impl
            orders.append(impl.postprocess_output(impl.forward(*impl.preprocess_qkv(tuple(local), meta), meta), meta))
        results.append(orders)
    return results


def gradients(rank, world, cases, plant_wrong_halo_adjoint=False):
    """Each (case, plan kwargs): the rank's ``(dq, dk, dv)`` of ``sum(out * w)`` (``w`` a fixed
    random tensor, sharded as the output; its text rows replicated). ``plant_wrong_halo_adjoint``:
    the halo's gradients are not sent back to their owners (a test that the check can fail)."""
    if plant_wrong_halo_adjoint:
        from sta_dist.parallel import call

        call.halo_back = lambda x, sched, comm: torch.cat(
            [x[:, :sched.box_tokens], x[:, x.shape[1] - (x.shape[1] - sched.box_tokens - _halo_rows(sched)):]], 1)
    results = []
    for i, (case, plan_kw) in enumerate(cases):
        q, k, v = full_inputs(case, seed=i)
        w = torch.randn(q.shape, generator=torch.Generator().manual_seed(100 + i))
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        attn = DistributedSlidingTileAttention(case.heads, case.head_dim, plan, case.kv_heads, backend="torch")
        local = [plan.shard(x, rank).requires_grad_() for x in (q, k, v)]
        out = attn(*local, window=case.window, text_length=case.text_length)
        (out * plan.shard(w, rank)).sum().backward()
        results.append(tuple(x.grad for x in local))
    return results


def _halo_rows(sched) -> int:
    from sta_dist import geometry

    return sum(geometry.packed_token_count(sched.layout.canvas, sched.layout.tile, t) for t in sched.halo_recv)


def selected_gradients(rank, world, cases, plant_wrong_halo_adjoint=False):
    """Each (case, window, select, window_rule, plan kwargs, seed): the rank's ``(dq, dk, dv)``
    of ``sum(out * w)`` (``w`` as in :func:`gradients`) and the tiles its query tiles attended
    (its SelectionInfo's ``attended``, ``q_tiles``, ``q_heads``); ``plant_wrong_halo_adjoint``:
    the fetched tiles' gradients are not sent back to their owners. Also the call's mode and
    the bytes the rank sent per step (forward and backward)."""
    from sta_dist.selection.attention import table_heads

    if plant_wrong_halo_adjoint:
        from sta_dist.parallel import call

        call.halo_back = lambda x, sched, comm: torch.cat(
            [x[:, :sched.box_tokens], x[:, x.shape[1] - (x.shape[1] - sched.box_tokens - _halo_rows(sched)):]], 1)
    results = []
    for case, window, select, rule, plan_kw, seed in cases:
        q, k, v = full_inputs(case, seed=seed)
        w = torch.randn(q.shape, generator=torch.Generator().manual_seed(100 + seed))
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        attn = DistributedSlidingTileAttention(case.heads, case.head_dim, plan, case.kv_heads, backend="torch")
        local = [plan.shard(x, rank).requires_grad_() for x in (q, k, v)]
        out, info = attn(*local, window=window, text_length=case.text_length, select=select, window_rule=rule,
                         return_selection=True)
        (out * plan.shard(w, rank)).sum().backward()
        windows = None if window is None else normalize_windows(window, case.heads)
        mode = call_schedule(plan, table_heads(windows, rule, case.heads, plan.grid, case.kv_heads).windows,
                             case.kv_heads, rank).mode
        results.append((tuple(x.grad for x in local), (info.attended, info.q_tiles, info.q_heads), mode,
                        dict(attn.comm.bytes_sent)))
    return results


def all_gradients(rank, world, cases, selected_cases, plant_wrong_halo_adjoint=False):
    """:func:`gradients` of ``cases`` and :func:`selected_gradients` of ``selected_cases``, in
    one spawn; a planted wrong halo adjoint is taken out again after them (the spawn's later
    calls, in a shared spawn, get the right one)."""
    from sta_dist.parallel import call

    right = call.halo_back
    try:
        return (gradients(rank, world, cases, plant_wrong_halo_adjoint),
                selected_gradients(rank, world, selected_cases, plant_wrong_halo_adjoint))
    finally:
        call.halo_back = right
