"""The backward against torch autograd of the one reference (float64): the torch backward in
float64, the Triton backward under the interpreter in float32 (tolerance twice the fp32
reference's own gradient error), the public call's autograd in every dtype; the window's
transpose by brute force; the no-grad path untouched; torch.func and torch.compile.

Shapes are tiny: the interpreter is slow (CI's budget for this file is ~40 s)."""

import dataclasses

import pytest
import torch

import sta_dist
from sta_dist import geometry as g
from sta_dist.api import _local_call
from sta_dist.backward import local_backward
from sta_dist.geometry import Box
from sta_dist.local import LocalHeads, LocalLayout, LocalText
from sta_dist.testing import error_bound, max_error, reference_attention

F64_ROUNDOFF = 256 * torch.finfo(torch.float64).eps
"""float64 roundoff of the backward's sums (tens of terms each), relative to the largest gradient."""


def qkv(B, canvas, L, H, Hkv, D=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = g.volume(canvas) + L
    return tuple(torch.randn(B, S, h, D, generator=gen) for h in (H, Hkv, Hkv))


def reference_grads(q, k, v, dout, dlse, compute_dtype=torch.float64, **kw):
    """``(out, lse, (dq, dk, dv))`` of the reference by autograd, for the loss
    ``sum(out * dout) + sum(lse * dlse)`` (rows with lse ``-inf`` left out)."""
    xs = tuple(x.detach().to(compute_dtype).requires_grad_() for x in (q, k, v))
    out, lse = reference_attention(*xs, **kw, compute_dtype=compute_dtype, return_lse=True)
    loss = (out * dout.to(compute_dtype)).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse.to(compute_dtype)).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, xs)


def grad_bounds(q, k, v, dout, dlse, ref, dtype, **kw):
    """Per gradient: twice the ``dtype`` reference's own error vs float64, plus one ulp."""
    _, _, base = reference_grads(q.to(dtype), k.to(dtype), v.to(dtype), dout, dlse, compute_dtype=dtype, **kw)
    return [error_bound(max_error(b, r), dtype, r) for b, r in zip(base, ref)]


def assert_close(got, ref, bounds, what=""):
    for name, x, r, bound in zip("qkv", got, ref, bounds):
        err = max_error(x, r)
        assert err <= bound, f"{what} d{name}: error {err:.3g} > bound {bound:.3g}"


# ---------------------------------------------------------------------------------------
# The transpose of the window, by brute force
# ---------------------------------------------------------------------------------------


def test_query_span_is_the_windows_transpose():
    """Per axis, the query tiles whose clamped window holds key tile ``c`` are exactly
    ``query_span``; a span off by one tile is caught by the same comparison."""
    planted_caught = False
    for n in range(1, 12):
        for k in range(1, n + 3):
            for c in range(n):
                attending = [q for q in range(n) if g.window_span(q, k, n)[0] <= c < g.window_span(q, k, n)[1]]
                lo, hi = g.query_span(c, k, n)
                assert list(range(lo, hi)) == attending, (n, k, c)
                planted_caught |= list(range(lo, hi + 1)) != attending
    assert planted_caught


def test_query_box_against_dense_tile_mask():
    grid, window = (3, 4, 5), (2, 3, 1)
    for key in range(g.num_tiles(grid)):
        kc = g.tile_coords(key, grid)
        dense = [q for q in range(g.num_tiles(grid)) if g.window_box(g.tile_coords(q, grid), window, grid).contains(kc)]
        assert g.query_box(kc, window, grid).tile_ids(grid) == dense


# ---------------------------------------------------------------------------------------
# local_backward against the reference
# ---------------------------------------------------------------------------------------

CANVAS, TILE, L = (2, 3, 5), (1, 2, 2), 4  # grid (2, 2, 3): partial tiles on two axes
WINDOWS = [(1, 2, 2), (2, 1, 3), (1, 1, 1), (3, 2, 2)]  # even, odd, wider than the grid


def natural_problem(B, H, Hkv, text_length, seed=0):
    q, k, v = qkv(B, CANVAS, L, H, Hkv, seed=seed)
    kw = dict(canvas=CANVAS, tile=TILE, window=WINDOWS[:H], text_length=text_length)
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    dlse = torch.randn(q.shape[0], H, q.shape[1], generator=gen, dtype=torch.float64)
    return q, k, v, dout, dlse, kw


@pytest.mark.parametrize("text_length", [3, (3, 1)])
def test_torch_backward_float64(text_length):
    """Per-head windows, GQA, partial tiles, text (one count, one per sample), dlse."""
    q, k, v, dout, dlse, kw = natural_problem(2, 4, 2, text_length)
    out, lse, ref = reference_grads(q, k, v, dout, dlse, **kw)
    local, heads, text, scale = _local_call(q, k, v, CANVAS, TILE, kw["window"], text_length, None, "natural")
    got = local_backward(*(x.double() for x in (q, k, v)), out, lse, dout, local, heads, text, scale, "torch",
                         dlse_bhs=dlse)
    assert all(x.dtype == torch.float64 for x in got)
    assert_close(got, ref, [F64_ROUNDOFF * r.abs().max().item() for r in ref])


def test_triton_backward_float32():
    """The Triton kernels under the interpreter: per-head windows, GQA, partial tiles,
    text, dlse, out/lse given (not recomputed). Per-sample text splits the batch before
    the kernels (the torch test covers it)."""
    q, k, v, dout, dlse, kw = natural_problem(1, 2, 1, 3)
    out, lse, ref = reference_grads(q, k, v, dout, dlse, **kw)
    local, heads, text, scale = _local_call(q, k, v, CANVAS, TILE, kw["window"], kw["text_length"], None, "natural")
    got = local_backward(q, k, v, out.float(), lse.float(), dout.float(), local, heads, text, scale, "triton",
                         dlse_bhs=dlse.float())
    assert_close(got, ref, grad_bounds(q, k, v, dout, dlse, ref, torch.float32, **kw), "triton")


def rank_parts(split_t: int, windows):
    """Two tile-mode "ranks" split along t: each holds its query tiles packed, then its
    key tiles (box first, then the halo), text queries that attend its own box's video
    keys (and, on rank 0 only, the text keys): the local problems a distributed call sums."""
    grid = g.grid_shape(CANVAS, TILE)
    parts = []
    for r, box in enumerate([Box((0, 0, 0), (split_t, *grid[1:])), Box((split_t, 0, 0), grid)]):
        own = box.tile_ids(grid)
        halo = [t for t in g.key_tiles(box, windows, grid) if t not in own]
        layout = LocalLayout.packed(CANVAS, TILE, L, own, own + halo,
                                    text_q_video_keys=g.packed_token_count(CANVAS, TILE, own))
        parts.append((layout, own, own + halo, LocalText(L, L, L if r == 0 else 0)))
    return parts


def to_local(x, tiles, layout):
    """Rows of the natural ``x [B, S, ...]`` as a packed layout holds them (tiles, then text)."""
    idx = g.packed_natural_index(CANVAS, TILE, tiles)
    return torch.cat([x[:, idx], x[:, g.volume(CANVAS):]], 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_ranks_sum_to_the_whole(backend):
    """Packed layouts with k/v tiles beyond the query tiles and ``text_q_video_keys``: each
    rank's backward with the FINAL out/lse, its dk/dv scattered back to their owners and
    summed (the halo's adjoint), equals the whole call's gradient. A halo's dk/dv left on
    the rank that read it (not returned to the owner) fails."""
    H, Hkv, windows = 1, 1, [(2, 1, 3)]  # per-head windows and GQA: the natural-order tests
    q, k, v = qkv(1, CANVAS, L, H, Hkv, seed=3)
    kw = dict(canvas=CANVAS, tile=TILE, window=windows, text_length=L)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out, lse, ref = reference_grads(q, k, v, dout, None, **kw)
    dtype = torch.float64 if backend == "torch" else torch.float32
    heads = LocalHeads.build(windows, g.grid_shape(CANVAS, TILE), Hkv)
    n_video = g.volume(CANVAS)
    got = [torch.zeros(x.shape, dtype=torch.float64) for x in (q, k, v)]
    own_only = torch.zeros(k.shape, dtype=torch.float64)
    lse_t = lse.transpose(1, 2)
    for layout, q_tiles, kv_tiles, text in rank_parts(1, windows):
        lq = [to_local(x, q_tiles, layout).to(dtype) for x in (q, out, dout)]
        lk = [to_local(x, kv_tiles, layout).to(dtype) for x in (k, v)]
        l_lse = to_local(lse_t, q_tiles, layout).transpose(1, 2).contiguous().to(dtype)
        dq, dk, dv = local_backward(lq[0], *lk, lq[1], l_lse, lq[2], layout, heads, text, D_SCALE, backend)
        q_rows = torch.cat([g.packed_natural_index(CANVAS, TILE, q_tiles), torch.arange(n_video, n_video + L)])
        kv_rows = torch.cat([g.packed_natural_index(CANVAS, TILE, kv_tiles), torch.arange(n_video, n_video + L)])
        got[0].index_add_(1, q_rows, dq.double())
        got[1].index_add_(1, kv_rows, dk.double())
        got[2].index_add_(1, kv_rows, dv.double())
        n_own = layout.text_q_video_keys
        own_only.index_add_(1, kv_rows[:n_own], dk[:, :n_own].double())
    bounds = ([F64_ROUNDOFF * r.abs().max().item() for r in ref] if backend == "torch"
              else grad_bounds(q, k, v, dout, None, ref, torch.float32, **kw))
    assert_close(got, ref, bounds, backend)
    assert max_error(own_only[:, :n_video], ref[1][:, :n_video]) > bounds[1]  # the planted wrong halo adjoint


D_SCALE = 32 ** -0.5


def test_key_box_parts_sum_to_the_whole():
    """``key_box``: a query's keys in two boxes (text keys counted in the first part only),
    each part's backward with the final out/lse; the parts sum to the whole gradient."""
    q, k, v, dout, dlse, kw = natural_problem(1, 2, 2, L)
    out, lse, ref = reference_grads(q, k, v, dout, dlse, **kw)
    local, heads, text, scale = _local_call(q, k, v, CANVAS, TILE, kw["window"], L, None, "natural")
    grid = local.grid
    halves = [(Box((0, 0, 0), (2, 1, 3)), text), (Box((0, 1, 0), grid), LocalText(0, 0, 0))]
    got = [torch.zeros(x.shape, dtype=torch.float64) for x in (q, k, v)]
    for box, part_text in halves:
        part = dataclasses.replace(local, key_box=box)
        grads = local_backward(*(x.double() for x in (q, k, v)), out, lse, dout, part, heads, part_text, scale,
                               "torch", dlse_bhs=dlse)  # delta is the rows' whole: dlse in every part
        for total, x in zip(got, grads):
            total += x
    assert_close(got, ref, [F64_ROUNDOFF * r.abs().max().item() for r in ref])


# ---------------------------------------------------------------------------------------
# The public call's autograd
# ---------------------------------------------------------------------------------------


def public_grads(q, k, v, dout, dlse, backend, dtype, **kw):
    xs = tuple(x.to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = sta_dist.sliding_tile_attention(*xs, **kw, backend=backend, return_lse=True)
    assert out.grad_fn is not None and lse.grad_fn is not None
    loss = (out.double() * dout).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse.double(), 0.0) * dlse).sum()
    return torch.autograd.grad(loss, xs)


SELECTS = {
    "topk": dict(window=(1, 2, 1), select=sta_dist.TopK(2)),
    "mass-clipped": dict(window=(2, 1, 2), select=sta_dist.Mass(0.6, share_heads=False), window_rule="clipped"),
    "fastvideo": dict(window=[(2, 2, 2), (1, 3, 1)], window_rule="fastvideo"),
    "sta": dict(window=[(1, 1, 1), (3, 2, 1)]),
}


@pytest.mark.parametrize("case, dtype", [("topk", torch.float32), ("mass-clipped", torch.float16),
                                         ("fastvideo", torch.bfloat16), ("sta", torch.float32),
                                         ("sta", torch.bfloat16)])
def test_public_autograd_torch_backend(case, dtype):
    """Windows of every rule, selected tiles (TopK, Mass), the lse output, in every dtype."""
    q, k, v = qkv(2, CANVAS, L, 2, 1, seed=5)
    kw = dict(canvas=CANVAS, tile=TILE, text_length=(2, 4), **SELECTS[case])
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    dlse = torch.randn(2, 2, q.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    _, _, ref = reference_grads(q.to(dtype), k.to(dtype), v.to(dtype), dout, dlse, **kw)
    got = public_grads(q, k, v, dout, dlse, "torch", dtype, **kw)
    assert all(x.dtype == dtype for x in got)
    assert_close(got, ref, grad_bounds(q, k, v, dout, dlse, ref, dtype, **kw), f"{case} {dtype}")


def test_public_autograd_triton_explicit_mask():
    """The table path on the Triton kernels (forward and backward), an explicit tile mask
    per head, the lse output differentiated."""
    q, k, v = qkv(1, CANVAS, L, 2, 1, seed=8)
    n = g.num_tiles(g.grid_shape(CANVAS, TILE))
    mask = torch.rand(1, 2, n, n, generator=torch.Generator().manual_seed(9)) < 0.25
    kw = dict(canvas=CANVAS, tile=TILE, window=(1, 1, 2), select=mask, text_length=3)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    dlse = torch.randn(1, 2, q.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    _, _, ref = reference_grads(q, k, v, dout, dlse, **kw)
    got = public_grads(q, k, v, dout, dlse, "triton", torch.float32, **kw)
    assert_close(got, ref, grad_bounds(q, k, v, dout, dlse, ref, torch.float32, **kw), "triton table")


def test_no_grad_takes_the_plain_path(monkeypatch):
    """``requires_grad=False`` (or no_grad) records nothing and never enters the Function."""
    from sta_dist import autograd

    def refuse(*args, **kwargs):
        raise AssertionError("the autograd path ran")

    monkeypatch.setattr(autograd._Attention, "apply", refuse)
    q, k, v = qkv(1, CANVAS, L, 2, 1)
    kw = dict(canvas=CANVAS, tile=TILE, window=(1, 2, 1), backend="torch")
    assert sta_dist.sliding_tile_attention(q, k, v, **kw).grad_fn is None
    assert sta_dist.sliding_tile_attention(q, k, v, **kw, select=sta_dist.TopK(1)).grad_fn is None
    with torch.no_grad():
        assert sta_dist.sliding_tile_attention(q.requires_grad_(), k, v, **kw).grad_fn is None


def test_gradient_only_through_the_output():
    """``return_lse=False``: the log-sum-exp output gets no gradient, only out's flows."""
    q, k, v = qkv(1, CANVAS, L, 2, 1, seed=12)
    kw = dict(canvas=CANVAS, tile=TILE, window=(1, 2, 1))
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    _, _, ref = reference_grads(q, k, v, dout, None, **kw)
    xs = tuple(x.clone().requires_grad_() for x in (q, k, v))
    (sta_dist.sliding_tile_attention(*xs, **kw, backend="torch").double() * dout).sum().backward()
    assert_close([x.grad for x in xs], ref, grad_bounds(q, k, v, dout, None, ref, torch.float32, **kw))


def test_torch_func_transforms_are_refused():
    q, k, v = qkv(1, CANVAS, L, 2, 1)
    kw = dict(canvas=CANVAS, tile=TILE, window=(1, 2, 1), backend="torch")
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(lambda q: sta_dist.sliding_tile_attention(q, k, v, **kw).sum())(q)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.vmap(lambda q: sta_dist.sliding_tile_attention(q[None], k, v, **kw))(q)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # the checks before the break
def test_torch_compile_runs_it_eagerly():
    """Under torch.compile the call is a graph break, run eagerly; the gradient is the eager one."""
    q, k, v = qkv(1, CANVAS, L, 2, 1, seed=14)
    kw = dict(canvas=CANVAS, tile=TILE, window=(1, 2, 1), backend="torch")

    def loss(q, k, v):
        return (sta_dist.sliding_tile_attention(q, k, v, **kw) * 2).sum()

    eager = [x.clone().requires_grad_() for x in (q, k, v)]
    loss(*eager).backward()
    compiled = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.compile(loss, backend="eager")(*compiled).backward()
    for a, b in zip(compiled, eager):
        assert torch.equal(a.grad, b.grad)


def test_cuda_backward_of_the_natural_canvas_goes_through_tiled_order(monkeypatch):
    """The Hopper backward reads tiled order: a natural-order call's inputs are carried
    there and its gradients back (the kernel stood in for by the torch backward on the
    tiled layout, float64), equal to the natural-order backward's."""
    import sta_dist.backward as bw

    q, k, v, dout, dlse, kw = natural_problem(1, 2, 1, L)
    out, lse, _ = reference_grads(q, k, v, dout, dlse, **kw)
    local, heads, text, scale = _local_call(q, k, v, CANVAS, TILE, kw["window"], L, None, "natural")
    seen = []

    def kernel(q, k, v, out, lse, dout, layout, heads, text, scale, keys, dlse):
        seen.append(layout)
        return bw.torch_backward(q, k, v, out, lse, dout, layout, heads, text, scale, keys, dlse)

    monkeypatch.setattr(bw, "_cuda_packed", kernel)
    args = (*(x.double() for x in (q, k, v)), out, lse, dout, local, heads, text, scale)
    got = bw.cuda_backward(*args, dlse_bhs=dlse)
    want = bw.torch_backward(*args, dlse_bhs=dlse)
    assert seen == [LocalLayout.tiled(CANVAS, TILE, L)]
    for x, w in zip(got, want):
        assert max_error(x, w) <= F64_ROUNDOFF * w.abs().max().item()


def test_route_names_the_backward():
    """The route says which kernel runs the backward, and why the faster ones do not."""
    from sta_dist.route import Device, route
    from tests.test_route import hunyuan_call

    r = route(hunyuan_call(), Device.hopper())
    assert r.video == "cuda" and r.backward == "cuda"  # natural order, through tiled order
    assert route(hunyuan_call(order="packed"), Device.hopper()).backward == "cuda"
    other = route(hunyuan_call(order="other"), Device.hopper())
    assert other.backward == "triton"
    assert "not cuda: reads whole tiles of consecutive rows (tiled order)" in other.describe_backward()
    from sta_dist.dispatch import UNVERIFIED_BACKWARD
    gated = route(hunyuan_call(order="packed"), Device("cuda", (9, 0), cuda_backward_library=UNVERIFIED_BACKWARD))
    assert gated.backward == "triton" and "STA_DIST_CUDA_BACKWARD=1 takes it" in gated.describe_backward()
    for change, why in ((dict(dtype="float32"), "is built for bfloat16 and float16, got dtype=float32"),
                        (dict(rows_aligned=False), "needs each query tile's first row a multiple of 4"),
                        (dict(head_dim=64), "is built for head dim 128")):
        r = route(hunyuan_call(order="packed", **change), Device.hopper())
        assert r.backward == "triton" and f"not cuda: {why}" in r.describe_backward(), r.describe_backward()
    cpu = route(hunyuan_call(), Device.cpu())
    assert cpu.backward == "torch" and "not triton" in cpu.describe_backward()
    assert route(hunyuan_call(dtype="bfloat16"), Device.cpu(interpreter=True), "torch").backward == "torch"
