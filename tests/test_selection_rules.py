"""Window rules as index math against brute force, and what TopK / Mass / a mask accept:
every refusal names the argument, the rule and the value."""

import itertools
import math
import random

import pytest
import torch

import sta_dist
from sta_dist import geometry
from sta_dist.geometry import Box
from sta_dist.selection import rules
from sta_dist.testing import attended_tiles


def brute_fastvideo(q, k, n):
    """FastVideo's mask on one axis, as its code writes it: a centre clamped to
    ``[k//2, n-1-k//2]`` with torch.clamp's convention (max wins), half-width ``k//2``."""
    centre = min(max(q, k // 2), n - 1 - k // 2)
    return [c for c in range(n) if abs(centre - c) <= k // 2]


def brute_clipped(q, k, n):
    return [c for c in range(n) if abs(q - c) <= k // 2]


def brute_sta(q, k, n):
    start = min(max(q - (k - 1) // 2, 0), max(n - k, 0))
    return [c for c in range(n) if start <= c < start + k]


BRUTE = dict(sta=brute_sta, fastvideo=brute_fastvideo, clipped=brute_clipped)


@pytest.mark.parametrize("rule", sorted(BRUTE))
def test_rule_span_matches_its_definition(rule):
    for n in range(1, 13):
        for k in range(1, n + 4):
            for q in range(n):
                lo, hi = rules.rule_span(q, k, n, rule)
                assert list(range(lo, hi)) == BRUTE[rule](q, k, n), (rule, q, k, n)


def test_fastvideo_is_sta_with_the_next_odd_window():
    for n, k, q in itertools.product(range(1, 13), range(1, 16), range(12)):
        if q < n:
            assert brute_fastvideo(q, k, n) == brute_sta(q, rules.fastvideo_as_sta(k), n)
    assert [rules.fastvideo_as_sta(k) for k in range(1, 7)] == [1, 3, 3, 5, 5, 7]
    assert rules.sta_window((2, 3, 4), "fastvideo") == (3, 3, 5)
    assert rules.sta_window((2, 3, 4), "clipped") is None


def test_clipped_window_lies_inside_its_covering_sta_window():
    for n, k, q in itertools.product(range(1, 11), range(1, 12), range(10)):
        if q < n:
            cover = brute_sta(q, rules.covering_sta_window((k, 1, 1), "clipped")[0], n)
            assert set(brute_clipped(q, k, n)) <= set(cover)


@pytest.mark.parametrize("rule", sorted(BRUTE))
def test_key_box_is_the_union_of_the_windows(rule):
    rng = random.Random(3)
    for _ in range(150):
        grid = tuple(rng.randint(1, 7) for _ in range(3))
        window = tuple(rng.randint(1, 8) for _ in range(3))
        lo = tuple(rng.randint(0, n - 1) for n in grid)
        box = Box(lo, tuple(rng.randint(l + 1, n) for l, n in zip(lo, grid)))
        union = set()
        for c in itertools.product(*[range(a, b) for a, b in zip(box.lo, box.hi)]):
            union |= set(rules.rule_tiles(c, window, grid, rule))
        assert set(rules.rule_key_box(box, window, grid, rule).tile_ids(grid)) == union


@pytest.mark.parametrize("rule", sorted(BRUTE))
def test_window_mask_matches_the_reference_tiles(rule):
    """The table path's window masks against the reference's own (built from each rule's
    definition in sta_dist.testing, not from rules.py)."""
    rng = random.Random(5)
    for _ in range(40):
        tile = tuple(rng.randint(1, 3) for _ in range(3))
        canvas = tuple(rng.randint(1, 9) for _ in range(3))
        grid = geometry.grid_shape(canvas, tile)
        window = tuple(rng.randint(1, n + 2) for n in grid)
        n = geometry.num_tiles(grid)
        mine = rules.window_mask(range(n), window, grid, rule)
        ref = attended_tiles(canvas, tile, [window], rule, None, 1)[0, 0]
        assert torch.equal(mine, ref), (canvas, tile, window, rule)
        widest = max(len(rules.rule_tiles(geometry.tile_coords(t, grid), window, grid, rule)) for t in range(n))
        assert rules.rule_volume(window, grid, rule) == widest


# -- what the configs accept ------------------------------------------------------------

@pytest.mark.parametrize("make, error, message", [
    (lambda: sta_dist.TopK(0), ValueError, r"TopK.k must be an int >= 1, got k=0"),
    (lambda: sta_dist.TopK(2.5), TypeError, r"TopK.k must be an int >= 1, got k=2.5 \(float\)"),
    (lambda: sta_dist.TopK(True), TypeError, r"TopK.k must be an int >= 1, got k=True \(bool\)"),
    (lambda: sta_dist.TopK(3, share_heads=1), TypeError, r"TopK.share_heads must be a bool, got share_heads=1"),
    (lambda: sta_dist.Mass(0), ValueError, r"Mass.p must be a float in \(0, 1\], got p=0"),
    (lambda: sta_dist.Mass(1.5), ValueError, r"Mass.p must be a float in \(0, 1\], got p=1.5"),
    (lambda: sta_dist.Mass(-0.1), ValueError, r"Mass.p must be a float in \(0, 1\], got p=-0.1"),
    (lambda: sta_dist.Mass(math.nan), ValueError, r"Mass.p must be a float in \(0, 1\], got p=nan"),
    (lambda: sta_dist.Mass("0.9"), TypeError, r"Mass.p must be a float in \(0, 1\], got p='0.9' \(str\)"),
    (lambda: sta_dist.Mass(0.9, share_heads=None), TypeError, r"Mass.share_heads must be a bool"),
])
def test_configs_refuse_bad_values(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_configs_are_frozen_and_normalised():
    top, mass = sta_dist.TopK(3), sta_dist.Mass(1)
    assert (top.k, top.share_heads, mass.p, mass.share_heads) == (3, True, 1.0, False)
    assert isinstance(mass.p, float)
    with pytest.raises(AttributeError):
        top.k = 4  # type: ignore[misc]


CANVAS, TILE = (2, 4, 6), (2, 2, 3)  # 1 x 2 x 2 = 4 tiles


def qkv(B=1, H=2, Hkv=2, D=32, L=3):
    S = 48 + L
    return torch.randn(B, S, H, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)


def call(q, k, v, **kw):
    args = dict(canvas=CANVAS, tile=TILE, window=(1, 1, 1), backend="torch")
    args.update(kw)
    return sta_dist.sliding_tile_attention(q, k, v, **args)


@pytest.mark.parametrize("kw, error, message", [
    (dict(select=sta_dist.TopK(5)), ValueError,
     r"TopK.k must be at most the number of key tiles n_tiles=4, got k=5"),
    (dict(select=torch.ones(1, 2, 4, 4, dtype=torch.int32)), TypeError,
     r"select mask must have dtype torch.bool \[B, H or 1, n_q_tiles, n_kv_tiles\], got select.dtype=torch.int32"),
    (dict(select=torch.ones(1, 3, 4, 4, dtype=torch.bool)), ValueError,
     r"select mask must be \[B, H or 1, n_q_tiles, n_kv_tiles\] = \[1, 2 or 1, 4, 4\], got select.shape=\(1, 3, 4, 4\)"),
    (dict(select=torch.ones(1, 1, 4, 5, dtype=torch.bool)), ValueError, r"got select.shape=\(1, 1, 4, 5\)"),
    (dict(select=torch.ones(4, 4, dtype=torch.bool)), ValueError, r"got select.shape=\(4, 4\)"),
    (dict(select=0.9), TypeError, r"select must be sta_dist.TopK, sta_dist.Mass or a bool tile mask tensor, got "
                                  r"select=0.9 \(float\)"),
    (dict(window=None), ValueError, r"window=None means the selection alone: give select=sta_dist.TopK"),
    (dict(window_rule="nabla"), ValueError,
     r"window_rule must be one of \('sta', 'fastvideo', 'clipped'\), got window_rule='nabla'"),
    (dict(select=sta_dist.TopK(1), window=(0, 1, 1)), ValueError, r"window entries must all be >= 1"),
])
def test_calls_refuse_bad_selections(kw, error, message):
    with pytest.raises(error, match=message):
        call(*qkv(), **kw)
