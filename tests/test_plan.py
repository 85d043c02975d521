"""Shard plans and call schedules: pure, checked over every rank at world sizes up to 64."""

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from sta_dist import ShardPlan, geometry
from sta_dist.parallel.cost import H100_NVLINK
from sta_dist.parallel.decide import best_tile_split, call_cost, call_schedule, mesh_cost
from sta_dist.parallel.schedule import assign_heads
from sta_dist.testing import sta_mask

HUNYUAN = dict(canvas=(30, 48, 80), tile=(6, 8, 8), text_len=256)


@pytest.mark.parametrize("world, kw", [
    (1, dict(mode="head")), (2, dict(mode="tile")), (3, dict(mode="head", order="natural")),
    (4, dict(mode="hybrid", mesh=(2, 2))), (5, dict(mode="tile")), (7, dict(mode="head")),
])
def test_shard_unshard_round_trip_is_exact(world, kw):
    plan = ShardPlan(canvas=(5, 7, 9), tile=(2, 3, 2), text_len=3, world_size=world, **kw)
    x = torch.randn(2, 5 * 7 * 9 + 3, 3, 4)
    locals_ = [plan.shard(x, r) for r in range(world)]
    assert sum(l.shape[1] - 3 for l in locals_) == 5 * 7 * 9
    assert torch.equal(plan.unshard(locals_), x)
    for r in range(world):
        pos = plan.positions(r)
        assert torch.equal((pos[:, 0] * 7 + pos[:, 1]) * 9 + pos[:, 2], plan.held_index(r))


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8, 16, 33, 64])
@pytest.mark.parametrize("mode", ["head", "tile", "hybrid"])
def test_schedules_agree_across_all_ranks(world, mode):
    if mode == "hybrid":
        mesh = next((m, world // m) for m in (4, 2, 1) if world % m == 0)
    else:
        mesh = None
    tile_ranks = 1 if mode == "head" else (mesh or (1, world))[1]
    if best_tile_split((5, 6, 10), tile_ranks) is None:  # e.g. 33 = 3 x 11 > 10 tiles on every axis
        with pytest.raises(ValueError, match="cannot split the tile grid"):
            ShardPlan(**HUNYUAN, mode=mode, world_size=world, mesh=mesh)
        return
    plan = ShardPlan(**HUNYUAN, mode=mode, world_size=world, mesh=mesh)
    windows = tuple([(3, 3, 3)] * 8 + [(1, 6, 10)] * 8 + [(5, 3, 3)] * 8)
    scheds = [call_schedule(plan, windows, 8, r) for r in range(world)]
    n_tiles = geometry.num_tiles(plan.grid)
    assert sorted(t for r in range(world) for t in plan.held_tiles(r)) == list(range(n_tiles))
    for r, s in enumerate(scheds):
        # every query head computed exactly once in each head group
        assert sorted(itertools.chain(*s.q_heads)) == list(range(24))
        assert s.held_counts == tuple(plan.held_count(m) for m in s.head_group)
        for j, other in enumerate(s.tile_group):
            o = scheds[other]
            assert s.halo_send[j] == o.halo_recv[o.tile_group.index(r)]
            assert o.q_heads == s.q_heads  # the tile group shares one head assignment
        # the kv storage holds every key tile the rank's query tiles need, and nothing else
        needed = set()
        for h in s.q_heads[s.me_in_head_group]:
            for qt in s.layout.q_tiles:
                needed |= set(geometry.window_tiles(geometry.tile_coords(qt, plan.grid), windows[h], plan.grid))
        present = {t for t, rows in enumerate(s.layout.kv_rows) if rows is not None}
        if s.mode != "head (fallback)" and s.q_heads[s.me_in_head_group]:
            assert needed == present
        else:
            assert needed <= present


def test_heads_go_to_ranks_by_cost():
    costs = [27.0] * 12 + [300.0] * 12  # 12 local heads, 12 dense heads
    by_cost = assign_heads(costs, 2, list(range(24)))
    loads = [sum(costs[h] for h in hs) for hs in by_cost]
    assert max(loads) == min(loads)
    contiguous = [sum(costs[:12]), sum(costs[12:])]
    assert max(loads) < max(contiguous)
    assert sorted(itertools.chain(*assign_heads([1.0] * 5, 3, list(range(5))))) == list(range(5))
    assert [len(h) for h in assign_heads([1.0] * 5, 3, list(range(5)))] == [2, 2, 1]  # H % P != 0


def test_auto_picks_by_the_cost_model_and_says_why():
    """``auto`` takes the mode the model prices lower for a call of the hinted windows (on
    two H100s: tile mode for local windows, and for whole-canvas ones, whose halo of the
    other half is exchanged beside the box's own keys); with selected tiles, by traffic."""
    for windows in (((3, 3, 3),), ((5, 6, 10),), ((1, 6, 10), (3, 3, 5), (5, 1, 10), (5, 3, 3))):
        plan = ShardPlan(**HUNYUAN, mode="auto", world_size=2, windows=windows, num_heads=24)
        times = plan.modelled_modes(windows)
        assert plan.mode == min(times, key=times.get) == "tile"
        assert "by the cost model" in plan.reason and f"head {times['head']:.2f} ms" in plan.reason
    few = ShardPlan(**HUNYUAN, mode="auto", world_size=2, windows=((1, 1, 1),), num_heads=2)
    assert few.mode == min(few.modelled_modes(((1, 1, 1),)), key=few.modelled_modes(((1, 1, 1),)).get)
    sparse = ShardPlan(**HUNYUAN, mode="auto", world_size=2, windows=((3, 3, 3),), selected_tiles=8)
    assert "halo" in sparse.reason and "cost model" not in sparse.reason
    assert ShardPlan(**HUNYUAN, mode="auto", world_size=1).mode == "head"


def test_plan_errors_are_clear():
    with pytest.raises(ValueError, match=r"mode must be one of \('head', 'tile', 'hybrid', 'auto'\), got mode='ring'"):
        ShardPlan(**HUNYUAN, mode="ring", world_size=2)
    with pytest.raises(ValueError, match=r"mesh=\(P_head, P_tile\) is for mode='hybrid' .* got mesh=\(2, 2\) "
                                         r"with mode='tile'"):
        ShardPlan(**HUNYUAN, mode="tile", world_size=4, mesh=(2, 2))
    with pytest.raises(ValueError, match=r"num_heads must be an int >= 1 or None, got num_heads=0"):
        ShardPlan(**HUNYUAN, mode="head", world_size=4, num_heads=0)
    with pytest.raises(ValueError, match=r"P_head \* P_tile = world_size = 4, got mesh=\(3, 2\)"):
        ShardPlan(**HUNYUAN, mode="hybrid", world_size=4, mesh=(3, 2))
    with pytest.raises(ValueError, match=r"order='natural' .* works in head mode only"):
        ShardPlan(**HUNYUAN, mode="tile", world_size=2, order="natural")
    with pytest.raises(ValueError, match=r"tile axis of 400 ranks cannot split the tile grid \(5, 6, 10\)"):
        ShardPlan(**HUNYUAN, mode="tile", world_size=400)
    with pytest.raises(ValueError, match=r"tile_split must multiply to the 4 tile ranks"):
        ShardPlan(**HUNYUAN, mode="tile", world_size=4, tile_split=(1, 1, 2))
    with pytest.raises(ValueError, match=r"world_size must be an int >= 1, got world_size=0"):
        ShardPlan(**HUNYUAN, mode="head", world_size=0)
    plan = ShardPlan(**HUNYUAN, mode="head", world_size=2)
    with pytest.raises(ValueError, match=r"x_full must be \[B, S, ...\] with S = T\*H\*W \+ L = 115456"):
        plan.shard(torch.zeros(1, 10, 2), 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got rank=2"):
        plan.shard(torch.zeros(1, 115456, 1), 2)


def test_halo_is_small_for_local_windows():
    plan = ShardPlan(**HUNYUAN, mode="tile", world_size=2, windows=((3, 3, 3),))
    s = call_schedule(plan, ((3, 3, 3),) * 24, 24, 0)
    halo = sum(len(t) for t in s.halo_recv)
    assert s.mode == "tile" and halo == 30  # one face of 5 x 6 tiles along the split


def test_hybrid_without_a_mesh_picks_a_two_d_mesh_by_cost():
    plan = ShardPlan(**HUNYUAN, mode="hybrid", world_size=8, num_heads=24, windows=((3, 3, 3),))
    assert plan.mesh == (2, 4) and "by cost" in plan.reason
    # the choice is the cheapest 2-D mesh under the same cost: recompute each candidate
    costs = {m: mesh_cost(plan.grid, m, ((3, 3, 3),), 24)[0] for m in ((2, 4), (4, 2))}
    assert costs[(2, 4)] <= costs[(4, 2)]
    # a prime world size has no 2-D mesh: the cheapest of head and tile
    assert ShardPlan(**HUNYUAN, mode="hybrid", world_size=3, num_heads=24).mesh in ((3, 1), (1, 3))


def test_auto_gives_every_rank_work_when_ranks_exceed_heads():
    plan = ShardPlan(**HUNYUAN, mode="auto", world_size=64, num_heads=24, windows=((3, 3, 3),))
    assert plan.mode == "hybrid" and "40 of 64 ranks without a head" in plan.reason
    windows = ((3, 3, 3),) * 24
    scheds = [call_schedule(plan, windows, 24, r) for r in range(64)]
    assert min(len(s.q_heads[s.me_in_head_group]) for s in scheds) >= 1
    assert ShardPlan(**HUNYUAN, mode="auto", world_size=64, windows=((3, 3, 3),)).mode in ("tile", "head")


@pytest.mark.parametrize("world, kw", [(1, dict(mode="head")), (3, dict(mode="head")), (2, dict(mode="tile")),
                                       (4, dict(mode="hybrid", mesh=(2, 2))), (3, dict(mode="tile"))])
def test_cost_model_work_adds_up_to_the_token_mask(world, kw):
    """Over all ranks the modelled work is every attended (query, key) pair of the mask, once."""
    canvas, tile, L, valid = (5, 7, 9), (2, 3, 2), 3, 2
    windows = ((1, 1, 1), (2, 3, 1), (3, 1, 2), (9, 9, 9))
    plan = ShardPlan(canvas=canvas, tile=tile, text_len=L, world_size=world, **kw)
    cost = call_cost(plan, windows, 2, batch=2, head_dim=8, itemsize=2, text_length=valid)
    pairs = sum(int(sta_mask(canvas, tile, w, L, valid).sum()) for w in windows)
    assert sum(r.flops for r in cost.ranks) == 4 * 2 * 8 * pairs
    one = call_cost(ShardPlan(canvas=canvas, tile=tile, text_len=L, world_size=1, mode="head"), windows, 2, 2, 8, 2,
                    valid)
    assert cost.time_ms(H100_NVLINK) > 0 and one.max_bytes() == 0


def test_cost_model_counts_copies_and_the_hidden_halo():
    """Head mode pays its copies (send buffers packed, outputs scattered); tile mode's halo
    is gathered beside the attention and its exchange costs time only beyond the interior
    tiles' attention, all of it when no tile of the box is interior."""
    windows = ((3, 3, 3),) * 24
    head = ShardPlan(**HUNYUAN, mode="head", world_size=2, windows=((3, 3, 3),), num_heads=24)
    tile = ShardPlan(**HUNYUAN, mode="tile", world_size=2, windows=((3, 3, 3),), num_heads=24)
    h, t = (call_cost(p, windows, 24, 1, 128, 2, 0).ranks[0] for p in (head, tile))
    assert h.copied > 0 and t.copied == 0 and h.beside == 0 and 0 < t.beside < t.flops
    assert t.time_ms(H100_NVLINK)[1] == pytest.approx(t.collectives * 0.05)  # the exchange is hidden
    no_interior = dataclasses.replace(t, beside=0.0)
    halo_ms = t.bytes_sent["halo exchange"] / (H100_NVLINK.link_gbps * 1e9) * 1e3
    assert no_interior.time_ms(H100_NVLINK)[1] == pytest.approx(t.time_ms(H100_NVLINK)[1] + halo_ms)
    more_copies = dataclasses.replace(h, copied=h.copied + 2.5e9)  # 2.5 GB at 2.5 TB/s: 1 ms
    assert more_copies.time_ms(H100_NVLINK)[1] == pytest.approx(h.time_ms(H100_NVLINK)[1] + 1.0)


def test_cost_model_within_15_percent_of_the_recorded_layer():
    """The model against the newest recorded 2-GPU layer run (docs/runs), mode by mode: the
    issue asks for 15%; a change to the model or the runtime that breaks it shows here."""
    path = Path(__file__).resolve().parents[1] / "docs" / "runs" / "2026-11-28-2xh100-keysplit-final-dist_bench_2.json"
    run = json.loads(path.read_text())
    windows = (tuple(run["window"]),) * run["heads"]
    checked = 0
    for name, row in run["rows"].items():
        if not name.startswith("sta_dist "):
            continue
        mode = name.split()[1]
        plan = ShardPlan(canvas=tuple(run["canvas"]), tile=tuple(run["tile"]), text_len=run["text_len"], mode=mode,
                         world_size=run["world_size"], windows=(tuple(run["window"]),), num_heads=run["heads"])
        predicted = call_cost(plan, windows, run["heads"], 1, 128, 2, 0).time_ms(H100_NVLINK)
        assert abs(predicted / row["ms"] - 1) <= 0.15, (name, predicted, row["ms"])
        checked += 1
    assert checked == 3
