"""Geometry against brute force: windows, tiles, orders, boxes, halos."""

import itertools
import random

import pytest
import torch

from sta_dist import geometry as g
from sta_dist import to_natural, to_tiled
from sta_dist.testing import sta_mask
from tests.cases import random_window


def random_shape(rng):
    tile = tuple(rng.randint(1, 4) for _ in range(3))
    canvas = tuple(rng.randint(1, 10) for _ in range(3))
    return canvas, tile, g.grid_shape(canvas, tile)


def brute_window(q, k, n):
    """Key tiles c on one axis: the rule of DESIGN §1, spelled out."""
    start = min(max(q - (k - 1) // 2, 0), max(n - k, 0))
    return [c for c in range(n) if start <= c < start + k]


@pytest.mark.parametrize("n", range(1, 12))
def test_window_span_matches_rule(n):
    for k in range(1, n + 4):
        for q in range(n):
            lo, hi = g.window_span(q, k, n)
            assert list(range(lo, hi)) == brute_window(q, k, n)
            assert hi - lo == min(k, n)  # always min(k, n) wide


def test_odd_window_is_clamped_centre():
    # FastVideo's rule for odd k: centred on q, shifted inward at the border.
    assert g.window_span(0, 3, 5) == (0, 3)
    assert g.window_span(2, 3, 5) == (1, 4)
    assert g.window_span(4, 3, 5) == (2, 5)
    assert g.window_span(1, 4, 6) == (0, 4)  # even k: exactly k tiles


@pytest.mark.parametrize("seed", range(40))
def test_window_tiles_match_brute_force_mask(seed):
    rng = random.Random(seed)
    canvas, tile, grid = random_shape(rng)
    window = random_window(rng, grid)
    n_video = g.volume(canvas)
    mask = sta_mask(canvas, tile, window, 0, 0)
    # token -> tile id, from the natural index
    pos = torch.stack(torch.meshgrid(*[torch.arange(c) for c in canvas], indexing="ij"), -1).reshape(-1, 3)
    tid = ((pos[:, 0] // tile[0]) * grid[1] + pos[:, 1] // tile[1]) * grid[2] + pos[:, 2] // tile[2]
    tile_mask = torch.zeros(g.num_tiles(grid), g.num_tiles(grid), dtype=torch.bool)
    for q in range(g.num_tiles(grid)):
        tile_mask[q, g.window_tiles(g.tile_coords(q, grid), window, grid)] = True
    assert torch.equal(tile_mask[tid][:, tid], mask[:n_video, :n_video])


@pytest.mark.parametrize("seed", range(30))
def test_tile_extent_and_coords(seed):
    rng = random.Random(seed)
    canvas, tile, grid = random_shape(rng)
    total = 0
    for tid in range(g.num_tiles(grid)):
        c = g.tile_coords(tid, grid)
        assert g.tile_id(c, grid) == tid
        ext = g.tile_extent(c, canvas, tile)
        assert all(1 <= e <= t for e, t in zip(ext, tile))
        total += g.volume(ext)
    assert total == g.volume(canvas)


@pytest.mark.parametrize("seed", range(30))
def test_tiled_order_groups_tiles(seed):
    rng = random.Random(seed)
    canvas, tile, grid = random_shape(rng)
    perm = g.tiled_permutation(canvas, tile)
    assert torch.equal(torch.sort(perm).values, torch.arange(g.volume(canvas)))
    pos = torch.stack([perm // (canvas[1] * canvas[2]), (perm // canvas[2]) % canvas[1], perm % canvas[2]], 1)
    tid = ((pos[:, 0] // tile[0]) * grid[1] + pos[:, 1] // tile[1]) * grid[2] + pos[:, 2] // tile[2]
    assert torch.equal(tid, torch.sort(tid).values)  # tiles in id order, each contiguous
    assert torch.equal(g.packed_positions(canvas, tile, range(g.num_tiles(grid))), pos)


@pytest.mark.parametrize("seed", range(30))
def test_tile_rows_formulas(seed):
    """TileRows (what the kernel uses) agree with the natural index of each token."""
    rng = random.Random(seed)
    canvas, tile, grid = random_shape(rng)
    ids = rng.sample(range(g.num_tiles(grid)), rng.randint(1, g.num_tiles(grid)))
    packed = g.packed_natural_index(canvas, tile, ids)
    natural_rows = g.natural_tile_rows(canvas, tile)
    packed_rows = g.packed_tile_rows(canvas, tile, ids)
    seen = []
    for tid, pr in zip(ids, packed_rows):
        et, eh, ew = g.tile_extent(g.tile_coords(tid, grid), canvas, tile)
        nr = natural_rows[tid]
        for lt, lh, lw in itertools.product(range(et), range(eh), range(ew)):
            seen.append((pr.base + lt * pr.stride_t + lh * pr.stride_h + lw,
                         nr.base + lt * nr.stride_t + lh * nr.stride_h + lw))
    rows, natural = zip(*seen)
    assert list(rows) == list(range(len(packed)))
    assert list(natural) == packed.tolist()


@pytest.mark.parametrize("seed", range(30))
def test_key_box_is_union_of_windows(seed):
    rng = random.Random(seed)
    canvas, tile, grid = random_shape(rng)
    lo = tuple(rng.randint(0, n - 1) for n in grid)
    hi = tuple(rng.randint(l + 1, n) for l, n in zip(lo, grid))
    box = g.Box(lo, hi)
    windows = [random_window(rng, grid) for _ in range(rng.randint(1, 3))]
    union = set()
    for tid in box.tile_ids(grid):
        for w in windows:
            union |= set(g.window_tiles(g.tile_coords(tid, grid), w, grid))
    assert g.key_tiles(box, windows, grid) == sorted(union)
    single = set()
    for tid in box.tile_ids(grid):
        single |= set(g.window_tiles(g.tile_coords(tid, grid), windows[0], grid))
    assert set(g.key_box(box, windows[0], grid).tile_ids(grid)) == single


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5, 6, 7, 8, 12])
def test_rank_boxes_partition_grid(parts):
    grid = (5, 6, 10)
    for split in g.factorizations(parts):
        if any(p > n for p, n in zip(split, grid)):
            continue
        boxes = g.rank_boxes(grid, split)
        assert len(boxes) == parts
        ids = sorted(t for b in boxes for t in b.tile_ids(grid))
        assert ids == list(range(g.num_tiles(grid)))
        sizes = [b.shape for b in boxes]
        for a in range(3):  # uneven splits differ by at most one tile
            assert max(s[a] for s in sizes) - min(s[a] for s in sizes) <= 1


@pytest.mark.parametrize("seed", range(10))
def test_tiled_round_trip_is_exact(seed):
    rng = random.Random(seed)
    canvas, tile, _ = random_shape(rng)
    text = rng.choice([0, 5])
    x = torch.randn(2, g.volume(canvas) + text, 3, 4)
    tiled = to_tiled(x, canvas, tile)
    assert torch.equal(tiled[:, g.volume(canvas):], x[:, g.volume(canvas):])
    assert torch.equal(to_natural(tiled, canvas, tile), x)
    assert torch.equal(tiled[:, : g.volume(canvas)], x[:, g.tiled_permutation(canvas, tile)])
