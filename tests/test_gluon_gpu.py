"""GPU-only (Hopper, capability 9): the experimental Gluon kernel ``sta_dist/kernels/sta_fwd_gluon.py``
against the dense float64/float32 reference, on whole-tile canvases in natural order with
text rows that the kernel ignores (the reference gets ``text_length=0``: no text keys).

Every test has a 120 s limit: a barrier-phase bug shows as a hang, not a stuck run. The
limit uses the thread method (stack dump, then the process exits): a hung kernel blocks
the main thread inside CUDA, where the signal method never fires."""

import math

import pytest
import torch

import sta_dist
from sta_dist.local import LocalLayout
from sta_dist.testing import error_bound, max_error, reference_attention, sampled_check
from sta_dist.kernel_calls import gluon_tables

cuda_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="needs a CUDA device of capability 9 (Hopper)",
)
pytestmark = [cuda_hopper, pytest.mark.gpu]

HUNYUAN, TILE = (30, 48, 80), (6, 8, 8)


def _kernel():
    from sta_dist.kernels.sta_fwd_gluon import sta_fwd_gluon

    return sta_fwd_gluon


def randn(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=dtype)


def head_table(windows, canvas, tile, n_heads, n_kv):
    """The kernel's ``heads [n, 5]`` table, built as the Triton backend builds it."""
    from sta_dist import geometry
    from sta_dist.local import LocalHeads
    from sta_dist.kernel_calls import head_table as _head_table

    heads = LocalHeads.build(windows, geometry.grid_shape(canvas, tile), n_kv)
    return _head_table(heads, tuple(range(n_heads)), torch.device("cuda"))


def run(canvas, tile, windows, n_heads, n_kv, dtype, text=16, batch=1, seed=0, lse=False, config=None, fill=float("nan"),
        text_keys=0, order="natural"):
    """Run the kernel; ``out`` starts as ``fill`` (NaN shows rows it did not write; 0 for the
    sampled checks, which also look at text rows, whose reference output is 0). ``text``
    rows follow the canvas; video queries attend the first ``text_keys`` of them. With
    ``order="tiled"`` the kernel gets tiled copies as packed tiles (the tables of the tiled
    layout) and ``out`` (and ``lse``) come back in natural order."""
    S = math.prod(canvas) + text
    q = randn((batch, S, n_heads, 128), dtype, seed)
    k = randn((batch, S, n_kv, 128), dtype, seed + 1)
    v = randn((batch, S, n_kv, 128), dtype, seed + 2)
    out = torch.full_like(q, fill)
    lse_t = torch.full((batch, n_heads, S), float("nan"), device="cuda") if lse else None
    tiled = order == "tiled"
    args = tuple(sta_dist.to_tiled(x, canvas, tile) for x in (q, k, v)) if tiled else (q, k, v)
    tables = gluon_tables(LocalLayout.tiled(canvas, tile, text), q.device) if tiled else None
    _kernel()(*args, head_table(windows, canvas, tile, n_heads, n_kv), out, canvas=canvas, tile=tile,
              scale=128**-0.5, config=config, lse=lse_t, text_keys=text_keys, order="packed" if tiled else order,
              tables=tables)
    torch.cuda.synchronize()
    if tiled:
        out = sta_dist.to_natural(out, canvas, tile)
        lse_t = sta_dist.to_natural(lse_t.transpose(1, 2), canvas, tile).transpose(1, 2) if lse else None
    return q, k, v, out, lse_t


def assert_video_rows_match(q, k, v, out, lse, canvas, tile, windows, text_keys=0, dtype=torch.bfloat16):
    """The video rows of ``out`` (and ``lse``) against the float64 reference, where video
    queries also see ``text_keys`` text rows; the text rows of ``out`` left unwritten (NaN)."""
    n = math.prod(canvas)
    kw = dict(canvas=canvas, tile=tile, window=windows, text_length=text_keys, rows=torch.arange(n), scale=128**-0.5)
    ref, ref_lse = reference_attention(q, k, v, **kw, return_lse=True)
    base = reference_attention(q, k, v, **kw, compute_dtype=dtype)
    err = max_error(out[:, :n], ref)
    assert err <= error_bound(max_error(base, ref), dtype, ref), (err, max_error(base, ref))
    assert max_error(lse[:, :, :n], ref_lse) <= 1e-3
    assert torch.isnan(out[:, n:]).all()


SMALL = [
    # canvas, tile, per-head windows (tiles), heads, kv heads
    ((6, 16, 16), (6, 8, 8), [(1, 1, 1), (1, 2, 2)], 2, 2),
    ((12, 16, 24), (6, 8, 8), [(1, 1, 1), (2, 2, 3), (3, 1, 2), (9, 9, 9)], 4, 2),
    ((8, 24, 16), (2, 8, 8), [(3, 3, 3), (1, 3, 1), (4, 1, 2), (2, 2, 2)], 4, 1),
    ((8, 8, 16), (4, 4, 8), [(2, 1, 1), (1, 2, 2)], 2, 2),
]


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("case", range(len(SMALL)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_even_shapes(case, dtype):
    canvas, tile, windows, n_heads, n_kv = SMALL[case]
    q, k, v, out, lse = run(canvas, tile, windows, n_heads, n_kv, dtype, lse=True)
    rows = torch.arange(math.prod(canvas))
    kw = dict(canvas=canvas, tile=tile, window=windows, text_length=0, rows=rows, scale=128**-0.5)
    ref, ref_lse = reference_attention(q, k, v, **kw, return_lse=True)
    base = reference_attention(q, k, v, **kw, compute_dtype=dtype)
    err = max_error(out[:, rows.cuda()], ref)
    assert err <= error_bound(max_error(base, ref), dtype, ref), (err, max_error(base, ref))
    lse_err = max_error(lse[:, :, rows.cuda()], ref_lse)
    assert lse_err <= 1e-3, lse_err
    # Text rows of out are not touched.
    assert torch.isnan(out[:, math.prod(canvas):]).all()


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("config", [dict(K_STAGES=2, V_STAGES=2), dict(K_STAGES=2, V_STAGES=3),
                                    dict(K_STAGES=3, V_STAGES=3), dict(K_STAGES=2, V_STAGES=3, PINGPONG=False)])
def test_stages_and_batch(config):
    canvas, tile = (12, 16, 24), (6, 8, 8)
    windows = [(3, 1, 2), (2, 2, 3)]
    q, k, v, out, _ = run(canvas, tile, windows, 2, 1, torch.bfloat16, batch=2, seed=3, config=config)
    rows = torch.arange(math.prod(canvas))
    kw = dict(canvas=canvas, tile=tile, window=windows, text_length=0, rows=rows, scale=128**-0.5)
    ref = reference_attention(q, k, v, **kw)
    base = reference_attention(q, k, v, **kw, compute_dtype=torch.bfloat16)
    err = max_error(out[:, rows.cuda()], ref)
    assert err <= error_bound(max_error(base, ref), torch.bfloat16, ref), (err, max_error(base, ref))


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("config", [dict(K_STAGES=2, V_STAGES=2), dict(K_STAGES=2, V_STAGES=4)])
def test_short_windows(config):
    """1, 2 and 8 key blocks per query block (fewer than the ring stages included), batch 2, GQA,
    fp16, LSE of both batches."""
    canvas, tile = (8, 8, 16), (4, 4, 8)
    windows = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 2)]
    q, k, v, out, lse = run(canvas, tile, windows, 4, 2, torch.float16, batch=2, seed=11, lse=True, config=config)
    rows = torch.arange(math.prod(canvas))
    kw = dict(canvas=canvas, tile=tile, window=windows, text_length=0, rows=rows, scale=128**-0.5)
    ref, ref_lse = reference_attention(q, k, v, **kw, return_lse=True)
    base = reference_attention(q, k, v, **kw, compute_dtype=torch.float16)
    err = max_error(out[:, rows.cuda()], ref)
    assert err <= error_bound(max_error(base, ref), torch.float16, ref), (err, max_error(base, ref))
    lse_err = max_error(lse[:, :, rows.cuda()], ref_lse)
    assert lse_err <= 1e-3, lse_err
    assert torch.isnan(out[:, math.prod(canvas):]).all() and torch.isnan(lse[:, :, math.prod(canvas):]).all()


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("case", range(len(SMALL)))
def test_tiled_order(case):
    """The same problems with q, k, v in tiled order (tile by tile, as ``to_tiled`` lays
    them), 3-D row boxes throughout: against the reference, bf16, text keys, LSE."""
    canvas, tile, windows, n_heads, n_kv = SMALL[case]
    q, k, v, out, lse = run(canvas, tile, windows, n_heads, n_kv, torch.bfloat16, text=40, seed=21, lse=True,
                            text_keys=33, order="tiled")
    assert_video_rows_match(q, k, v, out, lse, canvas, tile, windows, text_keys=33)


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("text_keys", [1, 77, 128, 200])
def test_text_keys(text_keys):
    """Video queries also attend the first ``text_keys`` text rows (a partial last text
    block is masked; 128 is one whole block, 200 one whole and one partial); text query
    rows are not written. 200 text rows, the rest padding; GQA, LSE."""
    canvas, tile, windows = (12, 16, 24), (6, 8, 8), [(1, 1, 1), (2, 2, 3), (3, 1, 2), (9, 9, 9)]
    q, k, v, out, lse = run(canvas, tile, windows, 4, 2, torch.bfloat16, text=200, seed=7, lse=True,
                            text_keys=text_keys)
    assert_video_rows_match(q, k, v, out, lse, canvas, tile, windows, text_keys=text_keys)


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("windows", [[(3, 3, 3)] * 24,
                                     [(3, 3, 3)] * 8 + [(5, 6, 10)] * 4 + [(1, 6, 10)] * 4 + [(5, 1, 10)] * 4
                                     + [(1, 1, 1)] * 4])
def test_hunyuan_shape(windows):
    q, k, v, out, _ = run(HUNYUAN, TILE, windows, 24, 24, torch.bfloat16, text=256, seed=5, fill=0.0)
    check = sampled_check(q, k, v, out, canvas=HUNYUAN, tile=TILE, window=windows, text_length=0)
    assert check["ok"], check


@pytest.mark.timeout(120, method="thread")
def test_hunyuan_gqa():
    windows = [(3, 3, 3)] * 12 + [(1, 6, 10)] * 12
    q, k, v, out, _ = run(HUNYUAN, TILE, windows, 24, 4, torch.bfloat16, text=0, seed=7, fill=0.0)
    check = sampled_check(q, k, v, out, canvas=HUNYUAN, tile=TILE, window=windows, text_length=0)
    assert check["ok"], check


def box_and_halo(canvas, tile, text, seed):
    """A tile-mode rank's local problem from natural-order tensors: its own box (the tiles
    with w index < 2) as query tiles, then as key tiles the box and its halo (w index 2),
    packed in that order as the halo exchange lays them, text rows after each. Returns the
    natural q, k, v, the local ones, the layout and the natural rows of the box."""
    from sta_dist import geometry

    grid = geometry.grid_shape(canvas, tile)
    ids = range(geometry.num_tiles(grid))
    box = [t for t in ids if geometry.tile_coords(t, grid)[2] < 2]
    halo = [t for t in ids if geometry.tile_coords(t, grid)[2] == 2]
    n = math.prod(canvas)
    q, k, v = (randn((1, n + text, 4, 128), torch.bfloat16, seed + i) for i in range(3))
    box_rows, kv_rows = (geometry.packed_natural_index(canvas, tile, t).cuda() for t in (box, box + halo))
    text_rows = torch.arange(n, n + text, device="cuda")
    local = (q[:, torch.cat([box_rows, text_rows])], *(x[:, torch.cat([kv_rows, text_rows])] for x in (k, v)))
    layout = LocalLayout.packed(canvas, tile, text, box, box + halo, text_q_video_keys=len(box_rows))
    return (q, k, v), local, layout, box_rows


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("text_keys", [0, 77])
def test_packed_box_and_halo(text_keys):
    """Packed tiles placed by tables (a tile-mode rank's box and halo): the box's rows
    against the reference on the natural tensors, with text keys and LSE; rows the kernel
    does not own (text queries) left unwritten."""
    canvas, tile, windows = (12, 16, 40), (6, 8, 8), [(1, 1, 1), (2, 1, 3), (1, 2, 3), (2, 2, 2)]
    (q, k, v), (ql, kl, vl), layout, box_rows = box_and_halo(canvas, tile, text=96, seed=31)
    out = torch.full_like(ql, float("nan"))
    lse = torch.full((1, 4, ql.shape[1]), float("nan"), device="cuda")
    _kernel()(ql, kl, vl, head_table(windows, canvas, tile, 4, 4), out, canvas=canvas, tile=tile, scale=128**-0.5,
              text_keys=text_keys, order="packed", tables=gluon_tables(layout, q.device), lse=lse)
    torch.cuda.synchronize()
    n_box = len(box_rows)
    kw = dict(canvas=canvas, tile=tile, window=windows, text_length=text_keys, rows=box_rows.cpu(), scale=128**-0.5)
    ref, ref_lse = reference_attention(q, k, v, **kw, return_lse=True)
    base = reference_attention(q, k, v, **kw, compute_dtype=torch.bfloat16)
    err = max_error(out[:, :n_box], ref)
    assert err <= error_bound(max_error(base, ref), torch.bfloat16, ref), (err, max_error(base, ref))
    assert max_error(lse[:, :, :n_box], ref_lse) <= 1e-3
    assert torch.isnan(out[:, n_box:]).all()
