"""The distributed backward on real gloo process groups: every mode's ``dq, dk, dv`` equal
the reference's autograd (a rank holds the gradients of its own video rows and of every
text row); a wrong halo adjoint fails the check."""

from __future__ import annotations

import pytest
import torch

from sta_dist import ShardPlan
from sta_dist.parallel.spawn import spawn_local
from sta_dist.testing import error_bound, max_error, reference_attention
from tests import dist_workers
from tests.cases import Case
from tests.test_distributed import EVEN_WIN, MANY_HEADS, ODD, PER_SAMPLE, WHOLE

pytestmark = pytest.mark.timeout(300)

GRAD_PLANS = {
    2: [(ODD, dict(mode="head")), (ODD, dict(mode="tile")), (ODD, dict(mode="head", order="natural")),
        (WHOLE, dict(mode="tile")), (PER_SAMPLE, dict(mode="tile"))],
    3: [(ODD, dict(mode="tile")), (MANY_HEADS, dict(mode="tile", tile_split=(1, 3, 1))), (EVEN_WIN, dict(mode="head"))],
    4: [(ODD, dict(mode="hybrid", mesh=(2, 2))), (MANY_HEADS, dict(mode="hybrid", mesh=(2, 2))),
        (ODD, dict(mode="tile", tile_split=(1, 2, 2)))],
}


def reference_gradients(case: Case, seed: int, dtype: torch.dtype):
    q, k, v = (x.to(dtype).requires_grad_() for x in dist_workers.full_inputs(case, seed))
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(100 + seed)).to(dtype)
    out = reference_attention(q, k, v, **case.kwargs(), compute_dtype=dtype)
    (out * w).sum().backward()
    return [x.grad for x in (q, k, v)]


def errors(case: Case, plan: ShardPlan, grads, seed: int):
    """Per tensor: the gathered gradient's error against float64, and its bound (from float32's)."""
    ref, base = reference_gradients(case, seed, torch.float64), reference_gradients(case, seed, torch.float32)
    out = []
    for j, (r, b) in enumerate(zip(ref, base)):
        full = plan.unshard([g[j] for g in grads])
        text = case.text_len
        for g in grads[1:]:  # text rows: the whole gradient on every rank
            assert torch.equal(g[j][:, g[j].shape[1] - text:], grads[0][j][:, grads[0][j].shape[1] - text:])
        out.append((max_error(full, r), error_bound(max_error(b, r), torch.float32, r)))
    return out


@pytest.mark.parametrize("world", sorted(GRAD_PLANS))
def test_every_mode_gives_the_reference_gradients(world):
    cases = GRAD_PLANS[world]
    results = spawn_local(dist_workers.gradients, world, (cases,), timeout_s=240)
    for i, (case, plan_kw) in enumerate(cases):
        plan = ShardPlan(canvas=case.canvas, tile=case.tile, text_len=case.text_len, world_size=world, **plan_kw)
        for name, (err, bound) in zip("qkv", errors(case, plan, [results[r][i] for r in range(world)], i)):
            assert err <= bound, f"d{name} of {case} {plan.describe()}: error {err:.3g} > {bound:.3g}"


def test_a_wrong_halo_adjoint_fails_the_check():
    cases = [(ODD, dict(mode="tile"))]
    results = spawn_local(dist_workers.gradients, 2, (cases, True), timeout_s=240)
    plan = ShardPlan(canvas=ODD.canvas, tile=ODD.tile, text_len=ODD.text_len, world_size=2, mode="tile")
    (dq, dk, dv) = errors(ODD, plan, [results[r][0] for r in range(2)], 0)
    assert dq[0] <= dq[1] and dk[0] > dk[1] and dv[0] > dv[1], (dq, dk, dv)
