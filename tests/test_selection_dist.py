"""Selected tiles on real gloo process groups: every mode equals the single-device
reference at 2, 3 and 4 ranks; each rank attends what the reference attends for its query
tiles and heads, and fetches exactly the remote tiles of that union (its window halo and
the tiles its queries chose), byte for byte."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import sta_dist
from sta_dist import ShardPlan, geometry
from sta_dist.config import normalize_windows
from sta_dist.parallel.decide import selected_call_cost
from sta_dist.testing import error_bound, max_error, reference_attention, reference_selection
from tests import dist_workers
from tests.cases import Case
from tests.world_spawns import shares, world_param

pytestmark = pytest.mark.timeout(300)

# odd canvases, partial tiles, per-head windows, GQA, text with padding, batch 2
ODD = Case((5, 7, 7), (2, 3, 3), [(1, 1, 1), (2, 1, 3), (3, 3, 1), (1, 2, 2)], 5, 3, 2, 4, 2, 32)
FLAT = Case((2, 8, 12), (1, 2, 3), (1, 3, 1), 3, 3, 1, 3, 3, 32)
N_FLAT = geometry.num_tiles(geometry.grid_shape(FLAT.canvas, FLAT.tile))
MASK = torch.rand(1, 3, N_FLAT, N_FLAT, generator=torch.Generator().manual_seed(7)) < 0.1

SELECTIONS = [  # (case, window, select, window_rule)
    (ODD, ODD.window, sta_dist.TopK(3), "sta"),
    (ODD, ODD.window, sta_dist.Mass(0.6), "clipped"),
    (FLAT, FLAT.window, sta_dist.TopK(2, share_heads=False), "fastvideo"),
    (FLAT, None, MASK, "sta"),
    (ODD, None, sta_dist.Mass(0.5, share_heads=True), "sta"),
    # text lengths per sample: a tile-mode rank fetches before it attends (one launch per length)
    (dataclasses.replace(ODD, text_length=(3, 1)), ODD.window, sta_dist.TopK(2), "sta"),
]


def plans(world: int):
    extra = {2: [dict(mode="head", order="natural")], 3: [dict(mode="tile", tile_split=(1, 1, 3))],
             4: [dict(mode="hybrid", mesh=(2, 2)), dict(mode="tile", tile_split=(1, 2, 2))]}[world]
    return [dict(mode="head"), dict(mode="tile"), dict(mode="auto")] + extra


@functools.lru_cache(maxsize=None)
def reference(j: int):
    """Selection ``j``'s reference: output (float64), the float32 bound, and the tiles each
    query tile attends per head ``[B, H, n, n]``."""
    case, window, select, rule = SELECTIONS[j]
    q, k, v = dist_workers.full_inputs(case, j)
    kw = dict(case.kwargs(), window=window, select=select, window_rule=rule)
    ref, tiles = reference_attention(q, k, v, **kw, return_selection=True)
    base = reference_attention(q, k, v, **kw, compute_dtype=torch.float32)
    selected = None if select is None else reference_selection(q, k, case.canvas, case.tile, select)
    return (ref, error_bound(max_error(base, ref), torch.float32, ref), tiles.expand(case.batch, case.heads, -1, -1),
            selected)


def check_call(j: int, plan: ShardPlan, results, i) -> None:
    """Call ``i`` (selection ``j``) on every rank against the reference: the output, the
    tiles each rank attended and fetched, the halo bytes."""
    case, window, select, rule = SELECTIONS[j]
    ref, bound, tiles, selected = reference(j)
    full = plan.unshard([results[r][i][0] for r in range(plan.world_size)])
    err = max_error(full, ref)
    assert err <= bound, f"{SELECTIONS[j]} {plan.describe()}: error {err:.3g} > {bound:.3g}"
    tokens = {t: geometry.packed_token_count(case.canvas, case.tile, [t]) for t in range(tiles.shape[-1])}
    fetched_from = {r: set() for r in range(plan.world_size)}  # (tile, by whom) others fetched from r
    for rank in range(plan.world_size):
        _, info, _, mode = results[rank][i]
        mine = tiles[:, list(info.q_heads)][:, :, list(info.q_tiles)]
        got = info.attended.expand(case.batch, len(info.q_heads), -1, -1)
        assert torch.equal(got, mine), (rank, plan.describe())
        tile_group = plan.tile_group(rank) if mode != "head (fallback)" else (rank,)
        if len(tile_group) == 1 or not info.q_heads:
            assert all(not f for f in info.fetched)
            continue
        own = set(plan.box_tiles(plan.head_group(rank)))
        union = set(mine.any(0).any(0).any(0).nonzero().flatten().tolist())
        assert set(t for f in info.fetched for t in f) == union - own, (rank, plan.describe())
        for member, f in zip(tile_group, info.fetched):
            assert set(f) <= set(plan.box_tiles(plan.head_group(member)))
            fetched_from[member] |= {(t, rank) for t in f}
    windows = None if window is None else normalize_windows(window, case.heads)
    predicted = selected_call_cost(plan, windows, rule, select, case.heads, case.kv_heads, case.batch,
                                   case.head_dim, 4, case.text_length, selected=selected)
    for rank in range(plan.world_size):  # halo bytes: what the others fetched from this rank, K and V
        _, info, sent, mode = results[rank][i]
        n_kv = len(plan_kv_heads(plan, rank, case))
        expected = sum(tokens[t] for t, _ in fetched_from[rank]) * case.batch * n_kv * case.head_dim * 2 * 4
        assert sent.get("halo exchange", 0) == expected, (rank, plan.describe(), sent)
        assert predicted.ranks[rank].bytes_sent == sent, (rank, plan.describe())  # the cost model is exact


def plan_kv_heads(plan: ShardPlan, rank: int, case: Case) -> tuple:
    from sta_dist.parallel.decide import call_schedule

    sched = call_schedule(plan, normalize_windows((1, 1, 1), case.heads), case.kv_heads, rank)
    return sched.kv_heads[sched.me_in_head_group]


def selected_calls(world: int) -> list:
    return [(j, plan_kw) for plan_kw in plans(world) for j in range(len(SELECTIONS))]


@pytest.mark.parametrize("world", [world_param("gloo", w) for w in (2, 3, 4)])
def test_every_mode_matches_reference_and_fetches_exactly_its_union(world, world_spawn):
    calls = selected_calls(world)
    results = world_spawn("gloo", world, "test_selection_dist:selected")
    modes = set()
    for i, (j, plan_kw) in enumerate(calls):
        case = SELECTIONS[j][0]
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        check_call(j, plan, results, i)
        modes |= {results[r][i][3] for r in range(world)}
    assert {"head", "tile"} <= modes


HUNYUAN = dict(canvas=(30, 48, 80), tile=(6, 8, 8), text_len=0)


def test_auto_sees_that_selected_tiles_widen_the_halo():
    """At HunyuanVideo's grid a (3,3,3) window's halo favours tile mode; 8 tiles chosen
    anywhere by each of a box's query tiles reach nearly the whole canvas: on 2 ranks that
    is still no more than head mode's all-to-all (148 of the other 150 tiles), on 4 it is.
    (Without selected tiles ``auto`` asks the cost model; with them, the traffic rule.)"""
    two = [ShardPlan(**HUNYUAN, mode="auto", world_size=2, windows=((3, 3, 3),), selected_tiles=s) for s in (0, 8)]
    assert [p.mode for p in two] == ["tile", "tile"] and "cost model" in two[0].reason and "halo 147.9" in two[1].reason
    four = [ShardPlan(**HUNYUAN, mode="auto", world_size=4, windows=((3, 3, 3),), selected_tiles=s) for s in (0, 8)]
    assert [p.mode for p in four] == ["tile", "head"] and "would cost more" in four[1].reason
    with pytest.raises(ValueError, match=r"selected_tiles must be a number >= 0 or None, got selected_tiles=-1"):
        ShardPlan(**HUNYUAN, mode="auto", world_size=2, selected_tiles=-1)


def test_expected_cost_of_a_selection():
    """Without the data the model expects TopK(k) to pick any tile with chance k / n: its
    work is within a few percent of the exact cost of a random selection, and a mask (known
    up front) is costed exactly."""
    case = Case((6, 16, 16), (2, 4, 4), (3, 3, 3), 0, 0, 1, 2, 2, 32)
    q, k, _ = dist_workers.full_inputs(case, 0)
    plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=0, mode="tile", world_size=2)
    windows = [(3, 3, 3)] * 2
    top = sta_dist.TopK(6)
    exact = selected_call_cost(plan, windows, "sta", top, 2, 2, 1, 32, 2, 0,
                               selected=reference_selection(q, k, case.canvas, case.tile, top))
    expected = selected_call_cost(plan, windows, "sta", top, 2, 2, 1, 32, 2, 0)
    for e, x in zip(exact.ranks, expected.ranks):
        assert abs(x.flops / e.flops - 1) < 0.05
    mask = reference_selection(q, k, case.canvas, case.tile, top)
    assert selected_call_cost(plan, windows, "sta", mask, 2, 2, 1, 32, 2, 0) == \
        selected_call_cost(plan, windows, "sta", mask, 2, 2, 1, 32, 2, 0, selected=mask)
    window_only = selected_call_cost(plan, windows, "sta", None, 2, 2, 1, 32, 2, 0)
    assert all(w.flops < x.flops for w, x in zip(window_only.ranks, expected.ranks))


@shares("gloo", 2)
def test_dist_bench_with_selection_runs_on_gloo(world_spawn):
    tmp_path = world_spawn.workdir("gloo", 2) / "dist_bench_selected"
    results = world_spawn("gloo", 2, "test_selection_dist:dist bench selected")
    diffs, check = results[0]
    assert any("tile" in name for name in diffs) and "one GPU, window alone" in diffs
    for name, diff in diffs.items():
        if diff is not None:
            assert diff <= 1e-5, (name, diff)
    assert check["selection_equal"], check
    assert (tmp_path / "dist_bench_2_selected.json").exists()


def spawn_parts(family: str, world: int, workdir) -> list:
    """This module's calls in the gloo family's shared spawn (tests/world_spawns.py)."""
    if family != "gloo":
        return []
    parts = []
    if world in (2, 3, 4):  # test_every_mode_matches_reference_and_fetches_exactly_its_union
        parts.append(("selected", dist_workers.run_selected,
                      ([(*SELECTIONS[j], kw, j) for j, kw in selected_calls(world)],)))
    if world == 2:  # test_dist_bench_with_selection_runs_on_gloo
        parts.append(("dist bench selected", dist_workers.dist_bench_selected,
                      (str(workdir / "dist_bench_selected"),)))
    return parts
