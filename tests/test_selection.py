"""Window plus selected tiles on one device: the tile means and the selection on the
device against the reference's brute force (bit for bit), and both backends against the
one reference for every selection kind and window rule."""

from __future__ import annotations

import random

import pytest
import torch

import sta_dist
from sta_dist import geometry
from sta_dist.local import LocalLayout
from sta_dist.selection.attention import selected_tiles
from sta_dist.selection.choose import select_tiles
from sta_dist.selection.means import means, tile_counts, tile_sums
from sta_dist.testing import (attended_tiles, error_bound, max_error, reference_attention, reference_selection,
                              reference_tile_means)
from tests.cases import Case, random_case

RULES = ("sta", "fastvideo", "clipped")


def random_select(rng: random.Random, case: Case):
    n = geometry.num_tiles(geometry.grid_shape(case.canvas, case.tile))
    kind = rng.choice(["topk", "topk", "mass", "mask"])
    if kind == "topk":
        return sta_dist.TopK(rng.randint(1, n), share_heads=rng.random() < 0.5)
    if kind == "mass":
        return sta_dist.Mass(rng.choice([0.3, 0.7, 0.9, 1.0]), share_heads=rng.random() < 0.5)
    g = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    return torch.rand(case.batch, rng.choice([1, case.heads]), n, n, generator=g) < 0.2


def selection_case(seed: int, max_tokens: int = 360):
    rng = random.Random(1000 + seed)
    case = random_case(seed, max_tokens=max_tokens)
    window = None if rng.random() < 0.2 else case.window
    return case, window, random_select(rng, case), rng.choice(RULES)


def check(case: Case, window, select, rule, backend: str, dtype=torch.float32, seed: int = 0) -> None:
    q, k, v = case.tensors(dtype, seed=seed)
    kw = dict(case.kwargs(), window=window, select=select, window_rule=rule)
    ref, ref_lse, ref_tiles = reference_attention(q, k, v, **kw, return_lse=True, return_selection=True)
    base = reference_attention(q, k, v, **kw, compute_dtype=dtype)
    out, lse, tiles = sta_dist.sliding_tile_attention(q, k, v, **kw, backend=backend, return_lse=True,
                                                      return_selection=True)
    assert torch.equal(tiles, ref_tiles), (case, window, select, rule)
    assert out.dtype == dtype and out.shape == q.shape
    err, bound = max_error(out, ref), error_bound(max_error(base, ref), dtype, ref)
    assert err <= bound, f"{case} {window} {select} {rule}: error {err:.3g} > bound {bound:.3g}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert max_error(lse[finite], ref_lse[finite]) <= (1e-5 if dtype == torch.float32 else 1e-3)


# -- the selection on the device, bit for bit -------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("order", ["natural", "tiled"])
def test_tile_means_equal_the_reference_bit_for_bit(seed, order):
    """Partial tiles, both token orders, per head and shared, both paths (Triton under the
    interpreter): float64 sums make the order of the tokens irrelevant."""
    case = random_case(seed, max_tokens=150)
    q, _, _ = case.tensors(torch.float16 if seed % 2 else torch.float32, seed=seed)
    layout = (LocalLayout.natural if order == "natural" else LocalLayout.tiled)(case.canvas, case.tile, case.text_len)
    x = q if order == "natural" else sta_dist.to_tiled(q, case.canvas, case.tile)
    counts = tile_counts(layout.q_tiles, case.canvas, case.tile, "cpu")
    for use_triton in (False, True):
        sums = tile_sums(x, layout.q_rows, layout.q_tiles, case.canvas, case.tile, use_triton)
        assert torch.equal(means(sums, counts), reference_tile_means(q, case.canvas, case.tile, False))
        shared = means(sums.sum(1, keepdim=True), counts, case.heads)
        assert torch.equal(shared, reference_tile_means(q, case.canvas, case.tile, True))


def test_tile_sums_over_several_column_blocks():
    """Rows wider than one program's block of columns (6 heads of 120: 720 columns), a
    head dim that is no power of two, partial tiles, a batch of two: the Triton sums
    equal the torch path's bit for bit."""
    case = Case((5, 7, 6), (2, 3, 4), (3, 3, 3), 0, 0, 2, 6, 6, 120)
    q, _, _ = case.tensors(torch.float16, seed=3)
    layout = LocalLayout.natural(case.canvas, case.tile, 0)
    torch_sums, triton_sums = (tile_sums(q, layout.q_rows, layout.q_tiles, case.canvas, case.tile, use)
                               for use in (False, True))
    assert torch.equal(triton_sums, torch_sums)
    assert torch.equal(means(triton_sums, tile_counts(layout.q_tiles, case.canvas, case.tile, "cpu")),
                       reference_tile_means(q, case.canvas, case.tile, False))


@pytest.mark.parametrize("seed", range(8))
def test_selection_equals_the_reference_bit_for_bit(seed):
    rng = random.Random(seed)
    case = random_case(seed)
    q, k, _ = case.tensors(torch.float32, seed=seed)
    n = geometry.num_tiles(geometry.grid_shape(case.canvas, case.tile))
    layout = LocalLayout.natural(case.canvas, case.tile, case.text_len)
    kv_heads = [h // (case.heads // case.kv_heads) for h in range(case.heads)]
    for select in (sta_dist.TopK(rng.randint(1, n), share_heads=bool(seed % 2)),
                   sta_dist.Mass(rng.choice([0.5, 0.9, 1.0]), share_heads=not seed % 2)):
        mine = selected_tiles(q, k, layout, kv_heads, select, use_triton=False)
        ref = reference_selection(q, k, case.canvas, case.tile, select)
        assert torch.equal(mine, ref), (case, select)
        if isinstance(select, sta_dist.TopK):
            assert (mine.sum(-1) == select.k).all()
        if isinstance(select, sta_dist.Mass) and select.p == 1.0:
            assert mine.all()


def test_ties_go_to_the_lower_tile_index():
    """Equal scores (integer means, exact): TopK keeps the lower indices and Mass drops the
    higher ones first."""
    qbar = torch.ones(1, 1, 2, 4)
    kbar = torch.tensor([[1.0, 0, 0, 0], [2, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [1, 0, 0, 0]])[None, None]
    top = select_tiles(qbar, kbar, sta_dist.TopK(3), 4)
    assert top[0, 0, 0].tolist() == [True, True, False, True, False]  # 2, 2, then the first 1
    kept = select_tiles(qbar, kbar, sta_dist.Mass(0.5), 4)
    # P ~ [1, e^.5, 1, e^.5, 1] / Z: the 1s (lowest) total 3/(3 + 2e^.5) = 0.476 < 0.5, so all three
    # fit under 1 - p = 0.5 and are dropped; with p = 0.6 only tiles 2 and 4 (total 0.317) are.
    assert kept[0, 0, 0].tolist() == [False, True, False, True, False]
    kept = select_tiles(qbar, kbar, sta_dist.Mass(0.6), 4)
    assert kept[0, 0, 0].tolist() == [True, True, False, True, False]


def test_reference_selection_follows_its_definition_on_a_small_example():
    """The reference against the rule written out with Python lists."""
    g = torch.Generator().manual_seed(0)
    canvas, tile = (2, 3, 4), (1, 2, 2)  # grid 2 x 2 x 2, partial tiles on h
    q, k = torch.randn(1, 24, 2, 32, generator=g), torch.randn(1, 24, 2, 32, generator=g)
    qbar = reference_tile_means(q, canvas, tile, True)[0, 0].double()
    kbar = reference_tile_means(k, canvas, tile, True)[0, 0].double()
    for i in range(8):
        s = [float(qbar[i] @ kbar[j]) for j in range(8)]
        ranked = sorted(range(8), key=lambda j: (-s[j], j))
        assert reference_selection(q, k, canvas, tile, sta_dist.TopK(3))[0, 0, i].nonzero().flatten().tolist() == \
            sorted(ranked[:3])
        z = [torch.tensor(s[j] / 32**0.5).exp().item() for j in range(8)]
        p = [x / sum(z) for x in z]
        dropped = []
        for j in reversed(ranked):
            if sum(p[d] for d in dropped) + p[j] < 1 - 0.8:
                dropped.append(j)
            else:
                break
        got = reference_selection(q, k, canvas, tile, sta_dist.Mass(0.8, share_heads=True))[0, 0, i]
        assert sorted(got.logical_not().nonzero().flatten().tolist()) == sorted(dropped)


# -- attention with selected tiles ------------------------------------------------------

@pytest.mark.parametrize("seed", range(24))
def test_torch_backend_matches_reference(seed):
    case, window, select, rule = selection_case(seed)
    check(case, window, select, rule, "torch", torch.float32 if seed % 3 else torch.float16, seed)


TRITON_CASES = [  # tiny: each runs under the Triton interpreter
    (Case((3, 5, 7), (2, 2, 3), [(1, 2, 1), (3, 1, 2)], 5, 3, 1, 2, 1, 32), sta_dist.TopK(3), "sta"),
    (Case((3, 5, 7), (2, 2, 3), (2, 1, 1), 0, 0, 1, 2, 2, 32), sta_dist.TopK(2, share_heads=False), "fastvideo"),
    (Case((2, 6, 5), (1, 3, 2), (1, 1, 3), 4, 4, 1, 2, 1, 32), sta_dist.Mass(0.6), "clipped"),
    (Case((4, 4, 4), (2, 2, 2), (3, 3, 3), 0, 0, 1, 1, 1, 32), None, "clipped"),
    (Case((3, 4, 6), (2, 2, 3), None, 3, 2, 2, 1, 1, 32), sta_dist.Mass(0.9, share_heads=True), "sta"),
]


@pytest.mark.parametrize("i", range(len(TRITON_CASES)))
def test_triton_kernel_matches_reference(i):
    case, select, rule = TRITON_CASES[i]
    check(case, case.window, select, rule, "triton", torch.float32 if i % 2 else torch.float16, seed=i)


def test_triton_kernel_with_per_sample_masks_and_text():
    """Different masks per sample and per head, samples with different valid text."""
    case = Case((2, 4, 3), (1, 2, 3), (1, 1, 1), 5, 3, 3, 2, 1, 32)
    n = geometry.num_tiles(geometry.grid_shape(case.canvas, case.tile))
    mask = torch.rand(3, 2, n, n, generator=torch.Generator().manual_seed(1)) < 0.3
    q, k, v = case.tensors(torch.float32, seed=2)
    kw = dict(case.kwargs(), text_length=[5, 0, 3], select=mask)
    ref = reference_attention(q, k, v, **kw)
    for backend in ("torch", "triton"):
        out = sta_dist.sliding_tile_attention(q, k, v, **kw, backend=backend)
        assert max_error(out, ref) <= 1e-5, backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tiled_layout_equals_natural(backend):
    case = Case((3, 4, 5), (2, 2, 3), (1, 2, 1), 3, 3, 1, 2, 1, 32)
    q, k, v = case.tensors(torch.float32, seed=4)
    kw = dict(case.kwargs(), select=sta_dist.TopK(2, share_heads=False), window_rule="clipped")
    natural, tiles = sta_dist.sliding_tile_attention(q, k, v, **kw, backend=backend, return_selection=True)
    tiled_in = [sta_dist.to_tiled(x, case.canvas, case.tile) for x in (q, k, v)]
    tiled, tiles_t = sta_dist.sliding_tile_attention(*tiled_in, **kw, backend=backend, layout="tiled",
                                                     return_selection=True)
    assert max_error(sta_dist.to_natural(tiled, case.canvas, case.tile), natural) <= 1e-5
    assert torch.equal(tiles, tiles_t)


def test_selection_mask_round_trips():
    """The returned tiles, given back as a mask with no window, reproduce the call."""
    case = Case((3, 6, 6), (1, 2, 2), [(1, 1, 1), (3, 1, 3)], 2, 2, 1, 2, 1, 32)
    q, k, v = case.tensors(torch.float32, seed=5)
    out, tiles = sta_dist.sliding_tile_attention(q, k, v, **case.kwargs(), select=sta_dist.Mass(0.5),
                                                 window_rule="fastvideo", backend="torch", return_selection=True)
    again = sta_dist.sliding_tile_attention(q, k, v, **dict(case.kwargs(), window=None), select=tiles,
                                            backend="torch")
    assert max_error(again, out) <= 1e-6


def test_fastvideo_window_alone_takes_the_window_path():
    """A FastVideo-rule window without a selection is sta_dist's window of the next odd
    size: the same output, no tables."""
    case = Case((4, 6, 8), (2, 2, 2), (2, 2, 4), 3, 3, 1, 2, 2, 32)
    q, k, v = case.tensors(torch.float32, seed=6)
    fast = sta_dist.sliding_tile_attention(q, k, v, **case.kwargs(), window_rule="fastvideo", backend="torch")
    odd = sta_dist.sliding_tile_attention(q, k, v, **dict(case.kwargs(), window=(3, 3, 5)), backend="torch")
    assert torch.equal(fast, odd)
    ref = reference_attention(q, k, v, **case.kwargs(), window_rule="fastvideo")
    assert max_error(fast, ref) <= 1e-5


def test_attended_tiles_have_one_head_when_they_can():
    assert attended_tiles((2, 4, 4), (1, 2, 2), [(1, 1, 1)] * 3, "sta", None, 2).shape == (2, 1, 8, 8)
    assert attended_tiles((2, 4, 4), (1, 2, 2), [(1, 1, 1), (3, 3, 3)], "sta", None, 2).shape == (2, 2, 8, 8)
