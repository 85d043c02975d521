"""Distributed STA on real gloo process groups: every mode equals the single-device
reference; round trips are exact; tile mode moves exactly the halo; failures are clear.

The calls of one world size run in the spawn the gloo family's modules share
(tests/world_spawns.py, :func:`spawn_parts`); a dying peer, a spawn past its deadline and
the fake backend's large worlds have spawns of their own."""

from __future__ import annotations

import pytest
import torch

from sta_dist import ShardPlan, geometry
from sta_dist.config import normalize_windows
from sta_dist.geometry import effective_window
from sta_dist.parallel.cost import H100_NVLINK
from sta_dist.parallel.decide import MIXED, CallPart, call_cost, call_mode, call_parts, call_schedule, parts_cost
from sta_dist.parallel.layout import whole_canvas_halo
from sta_dist.parallel.schedule import head_chunk, key_split
from sta_dist.run import RunConfig
from sta_dist.parallel.spawn import SpawnError, spawn_local
from sta_dist.testing import error_bound, max_error, reference_attention, sta_mask
from tests import dist_workers
from tests.cases import Case
from tests.world_spawns import shares, world_param

pytestmark = pytest.mark.timeout(300)

# odd canvases, partial tiles, per-head windows, GQA, text with padding
ODD = Case((7, 9, 13), (2, 3, 4), [(1, 1, 1), (2, 1, 3), (3, 3, 1), (1, 2, 2)], 5, 3, 2, 4, 2, 32)
EVEN_WIN = Case((4, 6, 8), (2, 2, 2), (2, 2, 2), 0, 0, 1, 2, 1, 32)
MANY_HEADS = Case((3, 8, 10), (1, 2, 2), [(1, 1, 1)] * 3 + [(1, 2, 3)] * 2, 4, 4, 1, 5, 5, 32)
WHOLE = Case((4, 4, 6), (2, 2, 2), [(9, 9, 9), (1, 1, 1)], 3, 2, 1, 2, 2, 32)

PLANS = {
    1: [(ODD, dict(mode="head")), (ODD, dict(mode="tile")), (ODD, dict(mode="auto"))],
    2: [(ODD, dict(mode="head")), (ODD, dict(mode="tile")), (ODD, dict(mode="head", order="natural")),
        (EVEN_WIN, dict(mode="tile")), (WHOLE, dict(mode="tile")), (MANY_HEADS, dict(mode="auto"))],
    3: [(ODD, dict(mode="head")), (ODD, dict(mode="tile")), (MANY_HEADS, dict(mode="head", order="natural")),
        (MANY_HEADS, dict(mode="tile", tile_split=(1, 3, 1))), (EVEN_WIN, dict(mode="head"))],
    4: [(ODD, dict(mode="hybrid", mesh=(2, 2))), (ODD, dict(mode="tile", tile_split=(1, 2, 2))),
        (MANY_HEADS, dict(mode="hybrid", mesh=(2, 2))), (EVEN_WIN, dict(mode="head")),
        (ODD, dict(mode="hybrid", mesh=(4, 1))), (MANY_HEADS, dict(mode="tile")),
        (EVEN_WIN, dict(mode="tile", tile_split=(1, 1, 4)))],  # non-neighbours exchange nothing
    8: [(Case((4, 6, 8), (2, 2, 2), [(1, 1, 1), (2, 3, 1)], 2, 2, 1, 2, 1, 32), dict(mode="tile")),
        (Case((4, 6, 8), (2, 2, 2), [(1, 1, 1), (2, 3, 1)], 2, 2, 1, 2, 1, 32), dict(mode="hybrid", mesh=(2, 4))),
        (Case((4, 6, 8), (2, 2, 2), (1, 1, 1), 2, 1, 1, 4, 2, 32), dict(mode="head"))],
}


def check_against_reference(case: Case, plan: ShardPlan, outs, seed: int) -> None:
    q, k, v = dist_workers.full_inputs(case, seed)
    full = plan.unshard(outs)
    ref = reference_attention(q, k, v, **case.kwargs())
    base = reference_attention(q, k, v, **case.kwargs(), compute_dtype=torch.float32)
    err, bound = max_error(full, ref), error_bound(max_error(base, ref), torch.float32, ref)
    assert err <= bound, f"{case} {plan.describe()}: error {err:.3g} > {bound:.3g}"
    for o in outs[1:]:  # text rows are replicated, identical on every rank
        assert torch.equal(o[:, o.shape[1] - case.text_len:], outs[0][:, outs[0].shape[1] - case.text_len:])


@pytest.mark.parametrize("world", [world_param("gloo", w) for w in sorted(PLANS)])
def test_every_mode_matches_reference(world, world_spawn):
    """The executor's default (overlapped) order against the reference, the bytes it moved
    against the cost model; in the same call, at 2-4 ranks, every order's bits
    (:func:`check_every_order_gives_the_same_bits`)."""
    cases = PLANS[world]
    order_cases = every_order_cases(world) if world in (2, 3, 4) else []
    both = world_spawn("gloo", world, "test_distributed:every mode")
    results, orders = [b[0] for b in both], [b[1] for b in both]
    check_every_order_gives_the_same_bits(world, order_cases, orders)
    seen = set()
    for i, (case, plan_kw) in enumerate(cases):
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        outs = [results[r][i][0] for r in range(world)]
        check_against_reference(case, plan, outs, seed=i)
        predicted = call_cost(plan, normalize_windows(case.window, case.heads), case.kv_heads, case.batch,
                              case.head_dim, 4, case.text_length)
        for r in range(world):  # the cost model's bytes are the bytes that moved
            assert predicted.ranks[r].bytes_sent == results[r][i][1], (case, plan_kw, r)
        modes = {results[r][i][2] for r in range(world)}
        assert len(modes) == 1
        if plan.mesh[1] > 1:  # a box that sees the whole canvas: head mode or tile mode, as the model chose
            wide = box_sees_whole_canvas(case, plan)
            assert modes <= ({"head (fallback)", plan.mode, MIXED} if wide else {plan.mode}), (case, modes)
            seen.add((wide, modes.pop()))
    if world == 2:  # whole-canvas windows in tile mode (the model finds it cheaper on two ranks)
        assert seen >= {(False, "tile"), (True, "tile")}, seen


# per-sample text lengths (one launch group per length), head chunks, a selection
PER_SAMPLE = Case((4, 6, 8), (2, 2, 2), [(1, 1, 1), (2, 3, 1)], 3, (3, 1), 2, 2, 1, 32)


def every_order_cases(world: int) -> list:
    from sta_dist import TopK

    return [(case, kw, None) for case, kw in PLANS[world]] + [
        (PER_SAMPLE, dict(mode="tile"), None), (PER_SAMPLE, dict(mode="head", head_chunks=2), None),
        (ODD, dict(mode="tile"), TopK(2)), (PER_SAMPLE, dict(mode="tile"), TopK(1))]


def check_every_order_gives_the_same_bits(world: int, cases, results) -> None:
    """The executor's overlapped order, its staged order (each exchange waited for before
    the attention that reads it) and the seed API's three hooks run the same launches on
    the same rows: their outputs are equal bit for bit in every mode, and equal the
    reference."""
    for i, (case, plan_kw, select) in enumerate(cases):
        for r in range(world):
            first, *others = results[r][i]
            for j, other in enumerate(others):
                assert torch.equal(first, other), (case, plan_kw, select, r, ("staged", "hooks")[j])
        if select is None:
            plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
            check_against_reference(case, plan, [results[r][i][1] for r in range(world)], seed=i)


# head mode in chunks of heads: one sample (received in place) and two, GQA, text, a
# whole-canvas head, tiled and natural order; chunk counts the heads allow and beyond
CHUNKED = [
    (Case((5, 6, 7), (2, 3, 4), [(1, 1, 1), (2, 1, 3), (9, 9, 9), (1, 2, 2), (3, 3, 1), (1, 1, 1)], 5, 3, 1, 6, 6, 32),
     dict(mode="head", head_chunks=3)),
    (Case((5, 6, 7), (2, 3, 4), [(1, 1, 1), (2, 1, 3), (3, 3, 1), (1, 2, 2)] * 2, 4, 4, 2, 8, 4, 32),
     dict(mode="head", head_chunks=2)),
    (Case((4, 6, 8), (2, 2, 2), (2, 2, 2), 0, 0, 1, 6, 3, 32), dict(mode="head", order="natural", head_chunks=5)),
    (Case((5, 6, 7), (2, 3, 4), (1, 2, 3), 3, 2, 2, 6, 6, 32), dict(mode="auto")),
]


@pytest.mark.parametrize("world", [world_param("gloo", w) for w in (2, 3)])
def test_head_mode_in_chunks_matches_reference(world, world_spawn):
    results = world_spawn("gloo", world, "test_distributed:head chunks")
    chunked = 0
    for i, (case, plan_kw) in enumerate(CHUNKED):
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        windows = normalize_windows(case.window, case.heads)
        check_against_reference(case, plan, [results[r][i][0] for r in range(world)], seed=i)
        predicted = call_cost(plan, windows, case.kv_heads, case.batch, case.head_dim, 4, case.text_length)
        for r in range(world):  # in chunks, the same bytes as in one exchange
            assert predicted.ranks[r].bytes_sent == results[r][i][1], (case, plan_kw, r)
        chunked += call_schedule(plan, windows, case.kv_heads, 0).head_chunks > 1
    assert chunked >= 2


@pytest.mark.parametrize("case, plan_kw, world", [
    (ODD, dict(mode="tile"), 2), (EVEN_WIN, dict(mode="tile"), 2),
    (MANY_HEADS, dict(mode="tile", tile_split=(1, 3, 1)), 3), (ODD, dict(mode="hybrid", mesh=(2, 2)), 4),
    (EVEN_WIN, dict(mode="tile", tile_split=(1, 1, 4)), 4)])
def test_key_split_covers_each_window_once(case, plan_kw, world):
    """The overlapped tile call's launches: every box query over the box's keys (with the
    text), then per neighbour the query tiles that reach its box over its halo tiles; for
    every head, the parts of a query tile's window add up to the window, each tile once."""
    plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
    windows = normalize_windows(case.window, case.heads)
    grid, folded = plan.grid, 0
    for rank in range(world):
        sched = call_schedule(plan, windows, case.kv_heads, rank)
        split = key_split(sched)
        box = set(sched.layout.q_tiles)
        assert split.own.q_tiles == sched.layout.q_tiles and split.own.q_text == case.text_len
        assert split.own.kv_video == sched.box_tokens and all(p.q_text == 0 for p in split.halo)
        assert all(r is None for t, r in enumerate(split.own.kv_rows) if t not in box)
        halo = {t for tiles in sched.halo_recv for t in tiles}
        for t in sched.layout.q_tiles:
            for w in set(sched.heads.windows):
                window = geometry.window_box(geometry.tile_coords(t, grid), w, grid)
                seen = []
                for part in (split.own, *split.halo):
                    if t in part.q_tiles:
                        seen += window.intersect(part.key_box).tile_ids(grid)
                assert sorted(seen) == sorted(window.tile_ids(grid)), (rank, t, w)
                assert set(seen) - box <= halo
        folded += sum(len(p.q_tiles) for p in split.halo)
    assert folded
    head = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=2, mode="head")
    assert key_split(call_schedule(head, windows, case.kv_heads, 0)) is None


def test_head_chunks_follow_the_heads():
    windows = ((1, 1, 1),) * 8
    plan = ShardPlan(canvas=(4, 6, 8), tile=(2, 2, 2), text_len=0, mode="head", world_size=2, head_chunks=3)
    sched = call_schedule(plan, windows, 4, 0)  # 2 kv heads per rank: 2 chunks at most
    assert sched.head_chunks == 2
    parts = [head_chunk(sched, c) for c in range(2)]
    assert [p.q_heads for p in parts] == [((0, 1), (4, 5)), ((2, 3), (6, 7))]
    assert [p.kv_heads for p in parts] == [((0,), (2,)), ((1,), (3,))]
    assert parts[1].heads.kv_heads == (0, 0)
    tile = ShardPlan(canvas=(4, 6, 8), tile=(2, 2, 2), text_len=0, mode="tile", world_size=2, head_chunks=3)
    assert call_schedule(tile, windows, 4, 0).head_chunks == 1  # the halo exchange is not chunked
    default = ShardPlan(canvas=(4, 6, 8), tile=(2, 2, 2), text_len=0, mode="head", world_size=2)
    assert call_schedule(default, windows, 4, 0).head_chunks == 1
    with pytest.raises(ValueError, match=r"head_chunks must be an int >= 1, got head_chunks=0"):
        ShardPlan(canvas=(4, 6, 8), tile=(2, 2, 2), text_len=0, mode="head", world_size=2, head_chunks=0)


# calls in parts (kv groups): heads whose window reaches the whole canvas from a box through
# the head all-to-all, the local heads in tile (or hybrid) mode; GQA, text, two samples
MIXED_CASES = [
    (Case((6, 8, 12), (2, 2, 3), [(1, 1, 1), (1, 1, 1), (9, 9, 9), (3, 9, 9), (2, 1, 1), (1, 2, 1), (1, 1, 1), (2, 2, 2)],
          5, 3, 2, 8, 4, 32), [[1], [0, 2, 3]]),
    (Case((6, 8, 10), (2, 2, 2), [(1, 1, 1)] * 4 + [(9, 9, 9)] * 2, 0, 0, 1, 6, 6, 32), [[4, 5], [0, 1, 2, 3]]),
]
MIXED_PLANS = {2: dict(mode="tile"), 3: dict(mode="tile"), 4: dict(mode="hybrid", mesh=(2, 2))}


def mixed_cases(world: int) -> list:
    return [(case, MIXED_PLANS[world], groups) for case, groups in MIXED_CASES]


@pytest.mark.parametrize("world", [world_param("gloo", w) for w in sorted(MIXED_PLANS)])
def test_a_call_in_parts_matches_reference(world, world_spawn):
    cases = mixed_cases(world)
    results = world_spawn("gloo", world, "test_distributed:call in parts")
    for i, (case, plan_kw, groups) in enumerate(cases):
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        check_against_reference(case, plan, [results[r][i][0] for r in range(world)], seed=i)
        parts = dist_workers.kv_group_parts(case, groups)
        predicted = parts_cost(plan, parts, case.batch, case.head_dim, 4, case.text_length)
        for r in range(world):  # the bytes of the parts, each its own schedule's
            assert predicted.ranks[r].bytes_sent == results[r][i][1], (case, plan_kw, r)
            assert results[r][i][2] == ["head (fallback)", plan.mode]  # wide heads all-to-all, local ones halo


def test_call_parts_split_the_real_strategy_by_cost():
    """On the real strategy's mixed layers in tile mode the model weighs the whole call in
    head mode (the fallback), in tile mode (the wide heads' halo: the rest of the canvas)
    and in two parts, and takes the cheapest; each runs as it says."""
    cfg = RunConfig.load("hunyuan_720p")
    strategy = cfg.strategy()
    plan = ShardPlan.from_config(cfg, 2, mode="tile", strategy=strategy)
    chosen_modes = set()
    for layer in range(4):
        windows = strategy.layer_windows(16, layer)
        windows = tuple(tuple(windows[h % len(windows)]) for h in range(cfg.heads))
        parts = call_parts(plan, windows, cfg.heads, 1, 128, 2, cfg.text_valid)
        whole = (CallPart(tuple(range(cfg.heads)), tuple(range(cfg.heads)), windows),)
        whole_tile = (CallPart(whole[0].q_heads, whole[0].kv_heads, windows, wide_tile=True),)
        wide = [h for h in range(cfg.heads) if whole_canvas_halo(plan, (plan_window(windows[h], plan),))]
        local = [h for h in range(cfg.heads) if h not in wide]
        two = tuple(CallPart(tuple(hs), tuple(hs), tuple(windows[h] for h in hs)) for hs in (wide, local))
        assert wide and local
        assert whole[0].schedule(plan, 0).mode == "head (fallback)" and whole_tile[0].schedule(plan, 0).mode == "tile"
        costs = {p: parts_cost(plan, p, 1, 128, 2, cfg.text_valid).time_ms(H100_NVLINK) for p in (whole, whole_tile, two)}
        assert parts in costs and costs[parts] == min(costs.values())
        mode = call_mode(plan, windows, cfg.heads, 0, 1, 128, 2, cfg.text_valid)
        assert mode == (MIXED if len(parts) > 1 else parts[0].schedule(plan, 0).mode)
        chosen_modes.add(mode)
        sent = call_cost(plan, windows, cfg.heads, 1, 128, 2, cfg.text_valid).ranks[0].bytes_sent
        if parts == whole_tile:  # no all-to-all: the halo, and the text rows' merge
            assert set(sent) == {"halo exchange", "text merge"}
    assert chosen_modes == {"tile"}  # on 2 H100s the model takes the whole call in tile mode
    head = ShardPlan.from_config(cfg, 2, mode="head", strategy=strategy)  # no tile axis: one part
    assert len(call_parts(head, windows, cfg.heads, 1, 128, 2, cfg.text_valid)) == 1


def box_sees_whole_canvas(case: Case, plan: ShardPlan) -> bool:
    """From the token mask: do the queries of some box attend every video token?"""
    n_video = geometry.volume(case.canvas)
    windows = case.window if isinstance(case.window[0], (list, tuple)) else [case.window]
    for rank in range(plan.world_size):
        rows = torch.cat([plan.held_index(r) for r in plan.head_group(rank)])
        seen = torch.zeros(n_video, dtype=torch.bool)
        for w in {tuple(x) for x in windows}:
            seen |= sta_mask(case.canvas, case.tile, w, 0, 0, rows)[:, :n_video].any(0)
        if seen.all():
            return True
    return False


def halo_bytes_brute_force(case: Case, plan: ShardPlan, rank: int) -> int:
    """Bytes rank sends in the halo exchange, from the token-level mask: for every other
    rank, each token of this rank's box that some query of that rank attends (K and V)."""
    n_video = geometry.volume(case.canvas)
    mine = torch.zeros(n_video, dtype=torch.bool)
    mine[plan.held_index(rank)] = True
    windows = case.window if isinstance(case.window[0], (list, tuple)) else [case.window]
    tokens = 0
    for other in range(plan.world_size):
        if other == rank:
            continue
        needed = torch.zeros(n_video, dtype=torch.bool)
        for w in {tuple(x) for x in windows}:
            needed |= sta_mask(case.canvas, case.tile, w, 0, 0, plan.held_index(other))[:, :n_video].any(0)
        tokens += int((needed & mine).sum())
    return tokens * case.batch * case.kv_heads * case.head_dim * 2 * 4  # K and V, float32


HALO_CASE = Case((4, 8, 12), (2, 2, 2), [(1, 1, 1), (1, 3, 1), (2, 1, 2)], 4, 4, 1, 3, 3, 32)
HALO_SPLITS = {2: None, 3: (1, 1, 3), 4: (1, 2, 2)}


@pytest.mark.parametrize("world, split", [world_param("gloo", w, s) for w, s in HALO_SPLITS.items()])
def test_tile_mode_moves_exactly_the_halo(world, split, world_spawn):
    case = HALO_CASE
    plan_kw = dict(mode="tile", tile_split=split)
    results = world_spawn("gloo", world, "test_distributed:halo")
    plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
    for rank in range(world):
        _, sent, mode = results[rank][0]
        assert mode == "tile"
        assert sent["halo exchange"] == halo_bytes_brute_force(case, plan, rank)
        assert "head all-to-all" not in sent and "output all-to-all" not in sent
        assert sent["text merge"] == case.batch * case.text_len * case.heads * (case.head_dim + 1) * 4 * (world - 1)
    check_against_reference(case, plan, [results[r][0][0] for r in range(world)], seed=0)


ROUND_TRIP_CASE = Case((3, 5, 7), (2, 2, 3), (1, 1, 1), 3, 3, 2, 5, 5, 32)
ROUND_TRIPS = {3: dict(mode="head"), 2: dict(mode="head", order="natural"), 4: dict(mode="hybrid", mesh=(2, 2))}


@pytest.mark.parametrize("world, plan_kw", [world_param("gloo", w, kw) for w, kw in ROUND_TRIPS.items()])
def test_all_to_all_round_trip_is_exact(world, plan_kw, world_spawn):
    results = world_spawn("gloo", world, "test_distributed:round trip")
    assert all(ok for ok, _ in results)


@shares("gloo", 2)
def test_ranks_that_disagree_fail_clearly(world_spawn):
    results = world_spawn.outcomes("gloo", 2, "test_distributed:disagreeing plans")
    for r in results:
        assert "ranks disagree on the attention config" in r and "rank 0:" in r and "rank 1:" in r


def test_dead_peer_ends_the_job_in_bounded_time():
    results = spawn_local(dist_workers.dying_peer, 3, timeout_s=90, collective_timeout_s=20, allow_failures=True)
    for message in results[:2]:
        assert message.startswith("CollectiveError"), message
        assert any(f"collective '{step}'" in message for step in ("check this call", "halo exchange", "text merge"))
        seconds = float(message.split(" after ")[1].split("s:")[0])
        assert seconds < 25
    assert "exited with code 3" in results[2]


@pytest.mark.parametrize("fake_world, fake_rank, plan_kw", [
    (16, 5, dict(mode="tile")), (33, 32, dict(mode="head")), (64, 0, dict(mode="hybrid", mesh=(4, 16))),
    (64, 63, dict(mode="tile")), (48, 17, dict(mode="auto")),
])
def test_large_world_shapes_on_fake_backend(fake_world, fake_rank, plan_kw):
    case = Case((12, 32, 64), (6, 8, 8), (3, 3, 3), 16, 16, 1, 64, 8, 32)
    (out_shape, in_shape, mode), = spawn_local(
        dist_workers.fake_world, 1, (case, plan_kw), backend="fake", timeout_s=120,
        env=dict(FAKE_RANK=str(fake_rank), FAKE_WORLD_SIZE=str(fake_world)))
    assert out_shape == in_shape
    assert mode in ("head", "tile", "hybrid")


def test_spawn_times_out_instead_of_hanging():
    with pytest.raises(SpawnError, match=r"did not finish within 3"):
        spawn_local(dist_workers.sleep_forever, 2, timeout_s=3)


@shares("gloo", 2)
def test_dist_bench_runs_on_gloo(world_spawn):
    results = world_spawn("gloo", 2, "test_distributed:dist bench")
    diffs = results[0]
    assert any("tile" in name for name in diffs) and any("head" in name for name in diffs)
    for name, diff in diffs.items():
        if diff is not None:
            assert diff <= 1e-5, (name, diff)
    assert (world_spawn.workdir("gloo", 2) / "dist_bench" / "dist_bench_2.json").exists()


@pytest.mark.parametrize("world", [world_param("gloo", w) for w in (2, 3)])
def test_ranks_that_make_different_calls_fail_on_every_rank(world, world_spawn):
    results = world_spawn("gloo", world, "test_distributed:different calls")
    for scenario in dist_workers.DISAGREEMENTS:
        for message in (r[scenario] for r in results):
            assert message.startswith("ValueError: ranks disagree on this call"), (scenario, message)
            assert all(f"rank {r}:" in message for r in range(world)), (scenario, message)


@shares("gloo", 3)
def test_one_invalid_rank_fails_every_rank_at_once(world_spawn):
    results = world_spawn("gloo", 3, "test_distributed:one invalid rank")
    for seconds, message in results:
        assert seconds < 10, (seconds, message)
        assert "ranks disagree on this call" in message and "rank 2: invalid call (ValueError: text_length" in message


@shares("gloo", 3)
def test_a_deferred_agreement_check_raises_on_every_rank_when_settled(world_spawn):
    for message in world_spawn("gloo", 3, "test_distributed:deferred agreement"):
        assert message.startswith("ranks disagree on this call: rank 0: same; rank 1: same; rank 2: rank 2"), message


def plan_window(window, plan: ShardPlan):
    return effective_window(tuple(window), plan.grid)


def test_a_send_that_lies_in_one_range_is_sent_from_where_it_lies():
    """A halo that is one range of the box (e.g. the whole box, for windows that span the
    canvas) goes out without a copy into a send buffer, even beside an empty part for the
    rank itself; parts that do not follow each other are copied once."""
    from sta_dist.parallel.comm import Comm

    comm = Comm()  # one process: the exchange hands back its send buffer
    x = torch.arange(48.0).view(1, 12, 4)
    (flat,) = comm.all_to_all_start("halo exchange", (0,), [[x.new_empty(0), x[:, 2:9]]], [28]).wait()
    assert flat.data_ptr() == x[:, 2:9].data_ptr() and torch.equal(flat, x[:, 2:9].flatten())
    (copied,) = comm.all_to_all_start("halo exchange", (0,), [[x[:, 0:2], x[:, 5:7]]], [16]).wait()
    assert copied.data_ptr() != x.data_ptr() and torch.equal(copied, torch.cat([x[:, 0:2], x[:, 5:7]], 1).flatten())


def spawn_parts(family: str, world: int, workdir) -> list:
    """This module's calls in the gloo family's shared spawn of ``world`` ranks
    (tests/world_spawns.py), each read by the test named beside it."""
    if family != "gloo":
        return []
    parts = []
    if world in PLANS:  # test_every_mode_matches_reference
        parts.append(("every mode", dist_workers.forward_checks,
                      (PLANS[world], every_order_cases(world) if world in (2, 3, 4) else [])))
    if world in (2, 3):  # test_head_mode_in_chunks_matches_reference
        parts.append(("head chunks", dist_workers.run_cases, (CHUNKED,)))
    if world in MIXED_PLANS:  # test_a_call_in_parts_matches_reference
        parts.append(("call in parts", dist_workers.run_in_parts, (mixed_cases(world),)))
    if world in HALO_SPLITS:  # test_tile_mode_moves_exactly_the_halo
        parts.append(("halo", dist_workers.run_cases, ([(HALO_CASE, dict(mode="tile", tile_split=HALO_SPLITS[world]))],)))
    if world in ROUND_TRIPS:  # test_all_to_all_round_trip_is_exact
        parts.append(("round trip", dist_workers.round_trip, (ROUND_TRIP_CASE, ROUND_TRIPS[world])))
    if world == 2:  # test_dist_bench_runs_on_gloo
        parts.append(("dist bench", dist_workers.dist_bench, (str(workdir / "dist_bench"),)))
    if world in (2, 3):  # test_ranks_that_make_different_calls_fail_on_every_rank
        parts.append(("different calls", dist_workers.disagreeing_calls, ()))
    if world == 3:  # test_one_invalid_rank_fails_every_rank_at_once, test_a_deferred_agreement_check_...
        parts.append(("one invalid rank", dist_workers.one_rank_invalid, ()))
        parts.append(("deferred agreement", dist_workers.deferred_disagreement, ()))
    if world == 2:  # test_ranks_that_disagree_fail_clearly (every rank raises)
        parts.append(("disagreeing plans", dist_workers.disagreeing_plans, ()))
    return parts
