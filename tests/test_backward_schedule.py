"""The Hopper backward's block schedule, run on the CPU: the kernels' own code that decides
which rows each program holds and streams (``kernels/sta_bwd_cuda.cu``'s ``program`` and
``schedule``, exported as ``sta_bwd_cuda_schedule``), on the tables the runtime builds
(``sta_dist.backward.cuda_tables``). Every (query row, key row) pair of every query head
that the one reference's mask attends must be covered exactly once by the dq kernel and
exactly once by the dk/dv kernel, and nothing else: windows per head, the window's
transpose, GQA, text with valid rows, several text blocks, the table path, a tile-mode
rank's box and halo, a clip box. The matrix products themselves run only on a GPU
(tests/test_backward_gpu.py). Needs nvcc (the library is built, never launched)."""

import types

import pytest
import torch

from sta_dist import geometry as g
from sta_dist.backward import cuda_tables
from sta_dist.geometry import Box
from sta_dist.kernels import sta_bwd_cuda, sta_fwd_cuda
from sta_dist.local import LocalHeads, LocalLayout, LocalText
from sta_dist.testing import sta_mask

pytestmark = pytest.mark.skipif(sta_fwd_cuda.nvcc() is None, reason="no nvcc on this machine")

CANVAS, TILE = (6, 16, 24), (2, 8, 8)  # grid (3, 2, 3) of 128-token tiles
GRID = g.grid_shape(CANVAS, TILE)
N_VIDEO = g.volume(CANVAS)
WINDOWS = [(1, 1, 3), (2, 2, 1), (3, 1, 2), (1, 2, 3)]


def truth(layout, heads, text, q_tiles, kv_tiles, selected=None):
    """``[H, Sq, Skv]`` bool: which local (query row, key row) pairs each query head attends,
    from the reference's mask in natural order (video rows) and the text rules."""
    q_nat = g.packed_natural_index(CANVAS, TILE, q_tiles)
    kv_nat = g.packed_natural_index(CANVAS, TILE, kv_tiles)
    n_q, n_kv = layout.q_video + layout.q_text, layout.kv_video + layout.q_text
    kv_tile = torch.tensor([t for t in kv_tiles for _ in range(g.volume(TILE))])
    out = torch.zeros(len(heads.windows), n_q, n_kv, dtype=torch.bool)
    for h, window in enumerate(heads.windows):
        mask = sta_mask(CANVAS, TILE, None if selected is not None else window, 0, 0, rows=q_nat,
                        tiles=None if selected is None else selected[h])
        video = mask[:, kv_nat]
        if layout.key_box is not None:
            inside = torch.tensor([layout.key_box.contains(g.tile_coords(int(t), GRID)) for t in kv_tile])
            video &= inside[None, :]
        out[h, :layout.q_video, :layout.kv_video] = video
        out[h, :layout.q_video, layout.kv_video:layout.kv_video + text.kv_for_video_q] = True
        q_text = slice(layout.q_video, layout.q_video + text.q_valid)
        out[h, q_text, :layout.text_q_video_keys] = True
        out[h, q_text, layout.kv_video:layout.kv_video + text.kv_for_text_q] = True
    return out


def covered(layout, heads, text, num_kv_heads, keys=None):
    """``(dq, dkdv)`` ``[H, Sq, Skv]`` counts: how often each pair is streamed by each kernel."""
    H, D = len(heads.windows), 128
    n_q, n_kv = layout.q_video + layout.q_text, layout.kv_video + layout.q_text
    q, dout = torch.empty(1, n_q, H, D, dtype=torch.bfloat16), torch.empty(1, n_q, H, D, dtype=torch.bfloat16)
    k = torch.empty(1, n_kv, num_kv_heads, D, dtype=torch.bfloat16)
    tables = cuda_tables(layout, heads, text, num_kv_heads, keys, torch.device("cpu"))
    args = sta_bwd_cuda.launch_args(q, k, k, dout, q, k, k, None, None, 0, **tables, scale=1.0)
    counts = []
    for dkdv in (False, True):
        c = torch.zeros(H, n_q, n_kv, dtype=torch.int16)
        for prog, blocks in sta_bwd_cuda.schedule(args, dkdv):
            for row, head, cols, rows in blocks:
                assert 0 < cols <= 64 and 0 <= rows <= 128
                if dkdv:  # resident keys of kv head x_head, streamed queries of head ``head``
                    assert heads.kv_heads[head] == prog["x_head"]
                    kept = min(rows, prog["valid"])
                    c[head, row:row + cols, prog["x_row"]:prog["x_row"] + kept] += 1
                else:  # resident queries of head x_head, streamed keys of its kv head
                    assert head == heads.kv_heads[prog["x_head"]]
                    c[prog["x_head"], prog["x_row"]:prog["x_row"] + prog["valid"], row:row + cols] += 1
        counts.append(c)
    return counts


def check(layout, heads, text, num_kv_heads, q_tiles, kv_tiles, keys=None, selected=None):
    want = truth(layout, heads, text, q_tiles, kv_tiles, selected).to(torch.int16)
    assert want.any()
    for name, got in zip(("dq", "dk/dv"), covered(layout, heads, text, num_kv_heads, keys)):
        wrong = (got != want).nonzero()
        assert len(wrong) == 0, (f"{name}: {len(wrong)} pairs counted wrongly, first (head, q row, k row) "
                                 f"{tuple(wrong[0].tolist())}: {int(got[tuple(wrong[0])])} times, "
                                 f"mask says {int(want[tuple(wrong[0])])}")


ALL = list(range(g.num_tiles(GRID)))


def test_whole_canvas_windows_gqa_text():
    layout = LocalLayout.packed(CANVAS, TILE, 40, ALL)
    check(layout, LocalHeads.build(WINDOWS, GRID, 2), LocalText(33, 33, 33), 2, ALL, ALL)


def test_text_over_several_blocks():
    """200 valid of 256 text rows: two resident text blocks (the second partial), four
    streamed ones."""
    layout = LocalLayout.packed(CANVAS, TILE, 256, ALL)
    check(layout, LocalHeads.build([(3, 1, 3)] * 4, GRID, 1), LocalText(200, 200, 200), 1, ALL, ALL)


def test_table_path():
    """Per head lists of key tiles (the selection's tables), their transpose for dk/dv."""
    n = len(ALL)
    selected = torch.rand(2, n, n, generator=torch.Generator().manual_seed(0)) < 0.3
    width = int(selected.sum(-1).max())
    lists = torch.zeros(1, 2, n, width, dtype=torch.int32)
    counts = selected.sum(-1, dtype=torch.int32)[None]
    for h in range(2):
        for t in range(n):
            ids = selected[h, t].nonzero().flatten()
            lists[0, h, t, :len(ids)] = ids
    keys = types.SimpleNamespace(keys=lists, counts=counts)
    layout = LocalLayout.packed(CANVAS, TILE, 24, ALL)
    check(layout, LocalHeads.build([(1, 1, 1)] * 2, GRID, 1), LocalText(20, 20, 20), 1, ALL, ALL, keys=keys,
          selected=selected)


@pytest.mark.parametrize("rank", [0, 1])
def test_tile_mode_rank_box_and_halo(rank):
    """A rank's own box (split along w) as query tiles, box then halo as key tiles; its
    text queries attend its box, and only rank 0 counts the text keys for them."""
    box = Box((0, 0, 0), (3, 2, 2)) if rank == 0 else Box((0, 0, 2), GRID)
    own = box.tile_ids(GRID)
    windows = [(1, 2, 3), (3, 1, 2)]
    halo = [t for t in g.key_tiles(box, windows, GRID) if t not in own]
    layout = LocalLayout.packed(CANVAS, TILE, 16, own, own + halo,
                                text_q_video_keys=g.packed_token_count(CANVAS, TILE, own))
    check(layout, LocalHeads.build(windows, GRID, 2), LocalText(16, 16, 16 if rank == 0 else 0), 2, own,
          own + halo)


def test_clip_box():
    """A key box: every window cut to it (the first part of a rank's keys)."""
    layout = LocalLayout.packed(CANVAS, TILE, 8, ALL)
    import dataclasses

    part = dataclasses.replace(layout, key_box=Box((0, 0, 0), (2, 1, 3)))
    check(part, LocalHeads.build(WINDOWS, GRID, 4), LocalText(8, 8, 8), 4, ALL, ALL)


def test_a_planted_error_is_seen():
    """The check fails when the schedule and the mask disagree (the mask of other windows)."""
    layout = LocalLayout.packed(CANVAS, TILE, 8, ALL)
    heads = LocalHeads.build([(1, 1, 3)] * 2, GRID, 1)
    other = LocalHeads.build([(1, 2, 3)] * 2, GRID, 1)
    want = truth(layout, other, LocalText(8, 8, 8), ALL, ALL).to(torch.int16)
    got, _ = covered(layout, heads, LocalText(8, 8, 8), 1)
    assert (got != want).any()
