"""The distributed backward on real gloo process groups: every mode's ``dq, dk, dv`` equal
the reference's autograd (a rank holds the gradients of its own video rows and of every
text row), for windows and for selected tiles (the reference attends the same selection,
given as a mask, so the selection's inputs get no gradient from it); a wrong halo adjoint
fails the check, and so do the fetched tiles' gradients kept where they were fetched.

One spawn per world size runs the window and the selected calls (a spawn costs more than
its calls): the spawn the gloo family's modules share (tests/world_spawns.py, beside the
forward checks of tests/test_distributed.py), the planted wrong adjoint last of this module's
calls and taken out after them."""

from __future__ import annotations

import pytest
import torch

import sta_dist
from sta_dist import ShardPlan
from sta_dist.testing import error_bound, max_error, reference_attention, reference_selection
from tests import dist_workers
from tests.cases import Case
from tests.test_distributed import EVEN_WIN, MANY_HEADS, ODD, PER_SAMPLE, WHOLE
from tests.test_selection_dist import FLAT, MASK
from tests.world_spawns import shares, world_param

pytestmark = pytest.mark.timeout(300)

GRAD_PLANS = {
    2: [(ODD, dict(mode="head")), (ODD, dict(mode="tile")), (ODD, dict(mode="head", order="natural")),
        (WHOLE, dict(mode="tile")), (PER_SAMPLE, dict(mode="tile"))],
    3: [(ODD, dict(mode="tile")), (MANY_HEADS, dict(mode="tile", tile_split=(1, 3, 1))), (EVEN_WIN, dict(mode="head"))],
    4: [(ODD, dict(mode="hybrid", mesh=(2, 2))), (MANY_HEADS, dict(mode="hybrid", mesh=(2, 2))),
        (ODD, dict(mode="tile", tile_split=(1, 2, 2)))],
}

SODD = Case((5, 7, 9), (2, 2, 2), [(1, 1, 1), (2, 1, 2), (1, 2, 1), (1, 1, 2)], 5, 3, 2, 4, 2, 32)  # odd, partial
GQA4 = Case((4, 6, 8), (2, 2, 2), [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 1)], 4, 2, 1, 4, 1, 32)  # 4 q heads, 1 kv

# (case, window, select, window_rule, plan kwargs): partial tiles, GQA, text with padding,
# per-sample text, window=None, every rule
SELECTED_PLANS = {
    2: [(SODD, SODD.window, sta_dist.TopK(3), "sta", dict(mode="tile")),
        (FLAT, None, MASK, "sta", dict(mode="tile")),
        (SODD, SODD.window, sta_dist.Mass(0.6), "clipped", dict(mode="head")),
        (PER_SAMPLE, PER_SAMPLE.window, sta_dist.TopK(2), "fastvideo", dict(mode="tile"))],
    3: [(FLAT, FLAT.window, sta_dist.TopK(2, share_heads=False), "fastvideo", dict(mode="tile", tile_split=(1, 1, 3))),
        (SODD, None, sta_dist.Mass(0.5, share_heads=True), "sta", dict(mode="tile")),
        (GQA4, GQA4.window, sta_dist.TopK(2), "clipped", dict(mode="head"))],
    4: [(SODD, SODD.window, sta_dist.TopK(3), "sta", dict(mode="hybrid", mesh=(2, 2))),
        (GQA4, GQA4.window, sta_dist.Mass(0.7), "clipped", dict(mode="hybrid", mesh=(2, 2))),
        (FLAT, None, MASK, "sta", dict(mode="tile", tile_split=(1, 2, 2)))],
}


def reference_gradients(case: Case, seed: int, dtype: torch.dtype, **call):
    """The reference's autograd of ``sum(out * w)``; ``call``: window/select/window_rule."""
    q, k, v = (x.to(dtype).requires_grad_() for x in dist_workers.full_inputs(case, seed))
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(100 + seed)).to(dtype)
    out = reference_attention(q, k, v, **{**case.kwargs(), **call}, compute_dtype=dtype)
    (out * w).sum().backward()
    return [x.grad for x in (q, k, v)]


def errors(case: Case, plan: ShardPlan, grads, seed: int, **call):
    """Per tensor: the gathered gradient's error against float64, and its bound (from float32's)."""
    ref = reference_gradients(case, seed, torch.float64, **call)
    base = reference_gradients(case, seed, torch.float32, **call)
    out = []
    for j, (r, b) in enumerate(zip(ref, base)):
        full = plan.unshard([g[j] for g in grads])
        text = case.text_len
        for g in grads[1:]:  # text rows: the whole gradient on every rank
            assert torch.equal(g[j][:, g[j].shape[1] - text:], grads[0][j][:, grads[0][j].shape[1] - text:])
        out.append((max_error(full, r), error_bound(max_error(b, r), torch.float32, r)))
    return out


def reference_choice(case: Case, window, select, rule: str, seed: int):
    """The reference's selection as a mask (from the inputs the ranks get), and the tiles each
    query tile attends with it, ``[B, H, n, n]``."""
    q, k, v = dist_workers.full_inputs(case, seed)
    mask = reference_selection(q, k, case.canvas, case.tile, select)
    _, tiles = reference_attention(q, k, v, **{**case.kwargs(), "window": window}, select=mask, window_rule=rule,
                                   return_selection=True)
    return mask, tiles.expand(case.batch, case.heads, -1, -1)


def selected_errors(j: int, call, plan: ShardPlan, results):
    """Selected call ``j`` on every rank: each rank attended the reference's tiles for its
    query tiles and heads; the gradients' errors and bounds (as :func:`errors`)."""
    case, window, select, rule, _ = call
    mask, tiles = reference_choice(case, window, select, rule, j)
    for rank in range(plan.world_size):
        (_, (attended, q_tiles, q_heads), _, _) = results[rank][j]
        mine = tiles[:, list(q_heads)][:, :, list(q_tiles)]
        assert torch.equal(attended.expand(case.batch, len(q_heads), -1, -1), mine), (rank, plan.describe())
    grads = [results[r][j][0] for r in range(plan.world_size)]
    return errors(case, plan, grads, j, window=window, select=mask, window_rule=rule)


def selected_calls(world: int):
    return [(*call, j) for j, call in enumerate(SELECTED_PLANS[world])]


@pytest.mark.parametrize("world", [world_param("gloo", w) for w in sorted(GRAD_PLANS)])
def test_every_mode_gives_the_reference_gradients(world, world_spawn):
    cases, calls = GRAD_PLANS[world], SELECTED_PLANS[world]
    windowed, chosen = zip(*world_spawn("gloo", world, "test_distributed_backward:gradients"))
    for i, (case, plan_kw) in enumerate(cases):
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        for name, (err, bound) in zip("qkv", errors(case, plan, [windowed[r][i] for r in range(world)], i)):
            assert err <= bound, f"d{name} of {case} {plan.describe()}: error {err:.3g} > {bound:.3g}"
    modes, returned = set(), 0
    for j, call in enumerate(calls):
        case, plan_kw = call[0], call[-1]
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        for name, (err, bound) in zip("qkv", selected_errors(j, call, plan, chosen)):
            assert err <= bound, f"d{name} of {call} {plan.describe()}: error {err:.3g} > {bound:.3g}"
        modes |= {chosen[r][j][2] for r in range(world)}
        # the fetched tiles' gradients go back: as many bytes as were fetched (a rank sends
        # back what it received)
        fetched, back = (sum(chosen[r][j][3].get(step, 0) for r in range(world)) for step in ("halo exchange",
                                                                                               "halo adjoint"))
        assert back == fetched, (plan.describe(), back, fetched)
        returned += back
    assert returned > 0
    assert modes >= {2: {"head", "tile"}, 3: {"head", "tile"}, 4: {"hybrid", "tile"}}[world], modes


PLANTED = ([(ODD, dict(mode="tile"))], [(FLAT, None, MASK, "sta", dict(mode="tile"), 0)])


@shares("gloo", 2)
def test_a_wrong_halo_adjoint_fails_the_check(world_spawn):
    """The halo's gradients not sent back: a window call's dk/dv fail, and so do a selected
    call's (window=None: every remote key tile it attends is a fetched one)."""
    cases, calls = PLANTED
    windowed, chosen = zip(*world_spawn("gloo", 2, "test_distributed_backward:wrong halo adjoint"))
    plan = ShardPlan(canvas=ODD.canvas, tile=ODD.tile, text_len=ODD.text_len, world_size=2, mode="tile")
    (dq, dk, dv) = errors(ODD, plan, [windowed[r][0] for r in range(2)], 0)
    assert dq[0] <= dq[1] and dk[0] > dk[1] and dv[0] > dv[1], (dq, dk, dv)
    plan = ShardPlan(canvas=FLAT.canvas, tile=FLAT.tile, text_len=FLAT.text_len, world_size=2, mode="tile")
    (dq, dk, dv) = selected_errors(0, calls[0][:-1], plan, chosen)
    assert dq[0] <= dq[1] and dk[0] > dk[1] and dv[0] > dv[1], (dq, dk, dv)


def spawn_parts(family: str, world: int, workdir) -> list:
    """This module's calls in the gloo family's shared spawn (tests/world_spawns.py)."""
    if family != "gloo":
        return []
    parts = []
    if world in GRAD_PLANS:  # test_every_mode_gives_the_reference_gradients
        parts.append(("gradients", dist_workers.all_gradients, (GRAD_PLANS[world], selected_calls(world))))
    if world == 2:  # test_a_wrong_halo_adjoint_fails_the_check
        parts.append(("wrong halo adjoint", dist_workers.all_gradients, (*PLANTED, True)))
    return parts
