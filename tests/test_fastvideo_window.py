"""FastVideo's window rule, as its kernels and its FlexAttention mask state it, against
:func:`sta_dist.geometry.fastvideo_window` (brute force, every small case)."""

import pytest
import torch

from sta_dist import geometry as g


def fastvideo_axis(q: int, k: int, n: int) -> set[int]:
    """Key tiles on one axis as FastVideo states it: half-width ``k // 2`` around a centre
    clamped to ``[k // 2, n - 1 - k // 2]`` (torch.clamp, as its mask does: when the bounds
    cross, the upper one wins)."""
    centre = int(torch.clamp(torch.tensor(q), k // 2, (n - 1) - k // 2))
    return {c for c in range(n) if abs(centre - c) <= k // 2}


@pytest.mark.parametrize("n", range(1, 13))
def test_fastvideo_window_covers_what_fastvideo_covers(n):
    for k in range(1, n + 5):
        (kk, _, _) = g.fastvideo_window((k, 1, 1), (n, 1, 1))
        for q in range(n):
            lo, hi = g.window_span(q, kk, n)
            assert set(range(lo, hi)) == fastvideo_axis(q, k, n), (q, k, n, kk)


def test_fastvideo_window_differs_only_for_even_windows_inside_the_grid():
    grid = (3, 6, 10)
    assert g.fastvideo_window((3, 3, 3), grid) == (3, 3, 3)
    assert g.fastvideo_window((2, 4, 6), grid) == (3, 5, 7)  # k + 1 tiles
    assert g.fastvideo_window((4, 6, 10), grid) == (3, 6, 10)  # k >= n: the whole axis
    assert g.fastvideo_window((1, 1, 12), grid) == (1, 1, 10)


def test_fastvideo_window_in_3d_matches_the_token_mask():
    """The 3-D token mask of FastVideo's rule (a product over axes) equals sta_dist's mask
    with the translated window, on a canvas with partial tiles."""
    from sta_dist.testing import sta_mask

    canvas, tile = (5, 7, 9), (2, 3, 4)
    grid = g.grid_shape(canvas, tile)
    n_video = canvas[0] * canvas[1] * canvas[2]
    idx = torch.arange(n_video)
    pos = torch.stack([idx // (canvas[1] * canvas[2]), (idx // canvas[2]) % canvas[1], idx % canvas[2]], 1)
    tiles = pos // torch.tensor(tile)
    for window in [(2, 2, 2), (1, 2, 3), (3, 1, 2), (4, 3, 1)]:
        allowed = [[fastvideo_axis(q, window[a], grid[a]) for q in range(grid[a])] for a in range(3)]
        want = torch.ones(n_video, n_video, dtype=torch.bool)
        for a in range(3):
            table = torch.tensor([[c in allowed[a][q] for c in range(grid[a])] for q in range(grid[a])])
            want &= table[tiles[:, a][:, None], tiles[:, a][None, :]]
        got = sta_mask(canvas, tile, g.fastvideo_window(window, grid), 0, 0)
        assert torch.equal(got, want), window
