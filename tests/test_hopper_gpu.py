"""GPU-only (Hopper, capability 9): the CUDA kernel (``kernels/sta_fwd_cuda.cu``)
against the dense float64 reference, on
whole-tile canvases in natural order and in packed tiles (the whole canvas in tiled order,
a tile-mode rank's box and halo), bf16 and fp16, with the log-sum-exp, GQA, batch and
text keys. Text query rows are the route's other kernels': the launch leaves them (and
their log-sum-exp) unwritten, which a NaN fill shows.

Every test has a 120 s limit (thread method: a hung kernel blocks the main thread inside
CUDA, where the signal method never fires), so a barrier-phase bug shows as a failure."""

import math

import pytest
import torch

import sta_dist
from sta_dist.kernel_calls import packed_tables
from sta_dist.kernels.sta_fwd_cuda import sta_fwd_cuda as launch
from sta_dist.local import LocalLayout
from sta_dist.testing import error_bound, max_error, reference_attention, sampled_check
from tests.hopper_support import box_and_halo, head_table, randn

cuda_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="needs a CUDA device of capability 9 (Hopper)",
)
pytestmark = [cuda_hopper, pytest.mark.gpu, pytest.mark.timeout(120, method="thread")]

HUNYUAN, TILE = (30, 48, 80), (6, 8, 8)


def run(canvas, tile, windows, n_heads, n_kv, dtype=torch.bfloat16, text=16, batch=1, seed=0, lse=False,
        fill=float("nan"), text_keys=0, order="natural"):
    """Run the kernel; ``out`` (and ``lse``) start as ``fill`` (NaN shows rows it did not
    write). ``text`` rows follow the canvas; video queries attend the first ``text_keys``.
    With ``order="tiled"`` the kernel gets tiled copies as packed tiles (the tables of the
    tiled layout) and ``out`` and ``lse`` come back in natural order."""
    S = math.prod(canvas) + text
    q = randn((batch, S, n_heads, 128), dtype, seed)
    k = randn((batch, S, n_kv, 128), dtype, seed + 1)
    v = randn((batch, S, n_kv, 128), dtype, seed + 2)
    out = torch.full_like(q, fill)
    lse_t = torch.full((batch, n_heads, S), float("nan"), device="cuda") if lse else None
    tiled = order == "tiled"
    args = tuple(sta_dist.to_tiled(x, canvas, tile) for x in (q, k, v)) if tiled else (q, k, v)
    tables = packed_tables(LocalLayout.tiled(canvas, tile, text), q.device) if tiled else None
    launch(*args, head_table(windows, canvas, tile, n_heads, n_kv), out, canvas=canvas, tile=tile,
                     scale=128**-0.5, lse=lse_t, text_keys=text_keys, order="packed" if tiled else order,
                     tables=tables)
    torch.cuda.synchronize()
    if tiled:
        out = sta_dist.to_natural(out, canvas, tile)
        lse_t = sta_dist.to_natural(lse_t.transpose(1, 2), canvas, tile).transpose(1, 2) if lse else None
    return q, k, v, out, lse_t


def assert_video_rows_match(q, k, v, out, lse, canvas, tile, windows, text_keys=0, dtype=torch.bfloat16):
    """The video rows of ``out`` (and ``lse``) against the float64 reference, where video
    queries also see ``text_keys`` text rows; the text rows left unwritten (NaN)."""
    n = math.prod(canvas)
    kw = dict(canvas=canvas, tile=tile, window=windows, text_length=text_keys, rows=torch.arange(n), scale=128**-0.5)
    ref, ref_lse = reference_attention(q, k, v, **kw, return_lse=True)
    base = reference_attention(q, k, v, **kw, compute_dtype=dtype)
    err = max_error(out[:, :n], ref)
    assert err <= error_bound(max_error(base, ref), dtype, ref), (err, max_error(base, ref))
    assert torch.isnan(out[:, n:]).all()
    if lse is not None:
        assert max_error(lse[:, :, :n], ref_lse) <= 1e-3
        assert torch.isnan(lse[:, :, n:]).all()


SMALL = [
    # canvas, tile, per-head windows (tiles), heads, kv heads: one key block per query block
    # up to whole-grid windows, tiles of one, two and three 128-row blocks, 4x8 planes
    ((2, 8, 8), (2, 8, 8), [(1, 1, 1)], 1, 1),
    ((6, 16, 16), (6, 8, 8), [(1, 1, 1), (1, 2, 2)], 2, 2),
    ((4, 16, 24), (2, 8, 8), [(1, 1, 1), (2, 1, 3), (1, 2, 2), (9, 9, 9)], 4, 2),
    ((8, 24, 16), (4, 8, 8), [(3, 3, 3), (1, 3, 1), (2, 1, 2), (2, 2, 2)], 4, 1),
    ((12, 16, 24), (6, 8, 8), [(1, 1, 1), (2, 2, 3), (3, 1, 2), (9, 9, 9)], 4, 4),
    ((8, 8, 16), (4, 4, 8), [(2, 1, 1), (1, 2, 2), (1, 1, 1), (2, 2, 2)], 4, 2),
]


@pytest.mark.parametrize("case", range(len(SMALL)))
@pytest.mark.parametrize("dtype, batch", [(torch.bfloat16, 1), (torch.float16, 2)])
def test_small_shapes(case, dtype, batch):
    canvas, tile, windows, n_heads, n_kv = SMALL[case]
    q, k, v, out, lse = run(canvas, tile, windows, n_heads, n_kv, dtype, batch=batch, seed=3 * case + batch,
                            lse=True)
    assert_video_rows_match(q, k, v, out, lse, canvas, tile, windows, dtype=dtype)


@pytest.mark.parametrize("case", range(len(SMALL)))
def test_tiled_order(case):
    """The same problems in tiled order (tile by tile, as ``to_tiled`` lays them): 3-D row
    boxes throughout, text keys, log-sum-exp."""
    canvas, tile, windows, n_heads, n_kv = SMALL[case]
    q, k, v, out, lse = run(canvas, tile, windows, n_heads, n_kv, text=40, seed=21, lse=True, text_keys=33,
                            order="tiled")
    assert_video_rows_match(q, k, v, out, lse, canvas, tile, windows, text_keys=33)


@pytest.mark.parametrize("text_keys", [1, 77, 128, 200, 256])
def test_text_keys(text_keys):
    """Video queries also attend the first ``text_keys`` text rows: a partial text block is
    masked, 128 is one whole block; with 200 text rows the last block reaches past the
    tensor (the copy engine fills zeros, the mask drops them); 256 rows for 256 keys."""
    canvas, tile, windows = (12, 16, 24), (6, 8, 8), [(1, 1, 1), (2, 2, 3), (3, 1, 2), (9, 9, 9)]
    text = 256 if text_keys == 256 else 200
    q, k, v, out, lse = run(canvas, tile, windows, 4, 2, text=text, text_keys=text_keys, seed=7, lse=True)
    assert_video_rows_match(q, k, v, out, lse, canvas, tile, windows, text_keys=text_keys)


def test_strided_views():
    """q/k/v as head slices of wider tensors (row strides larger than heads * 128)."""
    canvas, tile, windows = (4, 16, 24), (2, 8, 8), [(2, 1, 3), (1, 2, 2)]
    S = math.prod(canvas) + 40
    wide = randn((1, S, 6, 128), torch.bfloat16, 13)
    q, k, v = wide[:, :, 0:2], wide[:, :, 2:4], wide[:, :, 4:6]
    out = torch.full_like(wide, float("nan"))[:, :, 0:2]  # the kernel writes with q's strides
    launch(q, k, v, head_table(windows, canvas, tile, 2, 2), out, canvas=canvas, tile=tile,
                     scale=128**-0.5, text_keys=33)
    torch.cuda.synchronize()
    assert_video_rows_match(q, k, v, out, None, canvas, tile, windows, text_keys=33)


@pytest.mark.parametrize("inputs", ["fused heads", "sequence slice"])
@pytest.mark.parametrize("select", [None, "topk"])
def test_public_call_with_strided_inputs(inputs, select):
    """Through the public call, q/k/v as head slices of a fused projection, or as the first
    rows of a longer sequence (batch 1: a batch stride the new output does not share): the
    output is a new tensor whose strides need not be q's."""
    canvas, tile, window = (4, 16, 24), (2, 8, 8), (1, 2, 2)
    S = math.prod(canvas) + 40
    if inputs == "fused heads":
        wide = randn((1, S, 6, 128), torch.bfloat16, 21)
        q, k, v = wide[:, :, 0:2], wide[:, :, 2:4], wide[:, :, 4:6]
    else:
        q, k, v = (randn((1, S + 96, 2, 128), torch.bfloat16, 22 + i)[:, :S] for i in range(3))
    kw = dict(canvas=canvas, tile=tile, window=window, text_length=30)
    if select:
        kw["select"] = sta_dist.TopK(2)
    out = sta_dist.sliding_tile_attention(q, k, v, **kw)
    check = sampled_check(q, k, v, out, **kw, n_rows=512)
    assert check["ok"], check


@pytest.mark.parametrize("order", ["natural", "tiled"])
@pytest.mark.parametrize("windows, n_kv", [([(3, 3, 3)] * 24, 24),
                                           ([(3, 3, 3)] * 8 + [(5, 6, 10)] * 4 + [(1, 6, 10)] * 4 + [(5, 1, 10)] * 4
                                            + [(1, 1, 1)] * 4, 24),
                                           ([(3, 3, 3)] * 12 + [(1, 6, 10)] * 12, 4)])
def test_hunyuan_shape(order, windows, n_kv):
    """HunyuanVideo's canvas, sampled rows against the reference (text queries, which the
    launch leaves at the 0 fill, count as the route's)."""
    q, k, v, out, _ = run(HUNYUAN, TILE, windows, 24, n_kv, text=256, seed=5, fill=0.0, order=order)
    check = sampled_check(q, k, v, out, canvas=HUNYUAN, tile=TILE, window=windows, text_length=0)
    assert check["ok"], check


@pytest.mark.parametrize("text_keys, dtype", [(0, torch.bfloat16), (77, torch.bfloat16), (77, torch.float16)])
def test_packed_box_and_halo(text_keys, dtype):
    """Packed tiles placed by tables (a tile-mode rank's box and halo): the box's rows
    against the reference on the natural tensors, with text keys and log-sum-exp; rows the
    kernel does not own (text queries) left unwritten."""
    canvas, tile, windows = (12, 16, 40), (6, 8, 8), [(1, 1, 1), (2, 1, 3), (1, 2, 3), (2, 2, 2)]
    (q, k, v), local, layout, box_rows = box_and_halo(canvas, tile, text=96, seed=31)
    (q, k, v), (ql, kl, vl) = ((x.to(dtype) for x in (q, k, v)), (x.to(dtype) for x in local))
    out = torch.full_like(ql, float("nan"))
    lse = torch.full((1, 4, ql.shape[1]), float("nan"), device="cuda")
    launch(ql, kl, vl, head_table(windows, canvas, tile, 4, 4), out, canvas=canvas, tile=tile,
                     scale=128**-0.5, text_keys=text_keys, order="packed", tables=packed_tables(layout, q.device),
                     lse=lse)
    torch.cuda.synchronize()
    n_box = len(box_rows)
    kw = dict(canvas=canvas, tile=tile, window=windows, text_length=text_keys, rows=box_rows.cpu(), scale=128**-0.5)
    ref, ref_lse = reference_attention(q, k, v, **kw, return_lse=True)
    base = reference_attention(q, k, v, **kw, compute_dtype=dtype)
    err = max_error(out[:, :n_box], ref)
    assert err <= error_bound(max_error(base, ref), dtype, ref), (err, max_error(base, ref))
    assert max_error(lse[:, :, :n_box], ref_lse) <= 1e-3
    assert torch.isnan(out[:, n_box:]).all() and torch.isnan(lse[:, :, n_box:]).all()


@pytest.mark.parametrize("batch", [1, 2])
def test_halo_read_where_it_lies(batch):
    """A tile-mode rank's halo held apart from the box's k/v (as the overlapped exchange
    receives it: stored halo row by halo row) gives the very output of the joined k/v.
    (The box's keys and the halo's in two launches: tests/test_attention.py.)"""
    from sta_dist.kernel_calls import halo_tables

    canvas, tile, windows = (12, 16, 40), (6, 8, 8), [(1, 1, 1), (2, 1, 3), (1, 2, 3), (2, 2, 2)]
    _, (ql, kl, vl), layout, box_rows = box_and_halo(canvas, tile, text=96, seed=7)
    ql, kl, vl = (x.expand(batch, -1, -1, -1).contiguous() for x in (ql, kl, vl))
    n_box, n_kv = len(box_rows), layout.kv_video
    apart = [x[:, n_box:n_kv].transpose(0, 1).contiguous().transpose(0, 1) for x in (kl, vl)]  # [B, n, H, D] view
    kb, vb = (torch.cat([x[:, :n_box], x[:, n_kv:]], 1) for x in (kl, vl))
    table = head_table(windows, canvas, tile, 4, 4)
    joined = launch(ql, kl, vl, table, torch.empty_like(ql), canvas=canvas, tile=tile, scale=128**-0.5, text_keys=77,
                    order="packed", tables=packed_tables(layout, ql.device))
    held = launch(ql, kb, vb, table, torch.empty_like(ql), canvas=canvas, tile=tile, scale=128**-0.5, text_keys=77,
                  order="packed", tables=halo_tables(layout, n_box, ql.device), halo=tuple(apart))
    assert torch.equal(held[:, :n_box], joined[:, :n_box])


def test_cuda_refuses_what_its_rule_refuses():
    """The launcher refuses what the route's rule refuses, with the rule's reason."""
    from sta_dist.route import Call, Device, cuda_rule

    canvas, tile = (4, 16, 24), (2, 8, 8)
    q = randn((1, math.prod(canvas), 2, 128), torch.bfloat16, 0)

    def reason(x=q, tile=tile, text_keys=0, order="natural"):
        return cuda_rule(Call.of(x, x, x, canvas, tile, order, text_keys=text_keys), Device.hopper())

    assert reason() is None and reason(q.half()) is None
    assert "bfloat16 and float16" in reason(q.float())
    assert "blocks of 128 rows" in reason(tile=(1, 8, 8)) and "blocks of 128 rows" in reason(tile=(2, 4, 4))
    assert "text keys" in reason(text_keys=1)  # no text rows to attend
    assert "tokens here are other" in reason(order="other")
    with pytest.raises(ValueError, match="unsupported call: the kernel is built for bfloat16 and float16"):
        launch(q.float(), q.float(), q.float(), head_table([(1, 1, 1)] * 2, canvas, tile, 2, 2), q.float(),
                     canvas=canvas, tile=tile, scale=1.0)
    with pytest.raises(ValueError, match="order='packed' needs tables"):
        launch(q, q, q, head_table([(1, 1, 1)] * 2, canvas, tile, 2, 2), q, canvas=canvas, tile=tile,
                     scale=1.0, order="packed")


def table_route(tensors, canvas, tile, order, text_len, text_valid):
    """The video kernel of a table-path call with a log-sum-exp on these tensors."""
    from sta_dist.dispatch import call_route
    from sta_dist.local import LocalHeads, LocalText

    layout = getattr(LocalLayout, order)(canvas, tile, text_len)
    heads = LocalHeads.build([(1, 1, 1)] * tensors[0].shape[2], layout.grid, tensors[1].shape[2])
    return call_route(*tensors, layout, heads, LocalText.single(text_valid), return_lse=True, table=True).video


@pytest.mark.parametrize("canvas, window, select, rule, layout", [
    (HUNYUAN, (3, 3, 3), sta_dist.TopK(8), "sta", "natural"),
    (HUNYUAN, (3, 3, 3), sta_dist.TopK(8, share_heads=False), "fastvideo", "tiled"),
    ((18, 48, 80), None, sta_dist.Mass(0.5), "sta", "natural"),
    ((18, 48, 80), (3, 3, 5), None, "clipped", "tiled"),
])
def test_key_tables_at_real_shapes(canvas, window, select, rule, layout):
    """The table path (window plus selected tiles, other window rules) on the CUDA kernel:
    the route takes it, sampled rows pass against the reference with the tiles the call
    returned, and output and log-sum-exp agree with the Triton kernel's on those tiles."""
    S = math.prod(canvas) + 256
    q, k, v = (randn((1, S, 24, 128), torch.bfloat16, i) for i in range(3))
    kw = dict(canvas=canvas, tile=TILE, window=window, text_length=200)
    args = (q, k, v) if layout == "natural" else tuple(sta_dist.to_tiled(x, canvas, TILE) for x in (q, k, v))
    call = dict(kw, select=select, window_rule=rule, layout=layout)
    assert table_route(args, canvas, TILE, layout, 256, 200) == "cuda"
    out, lse, tiles = sta_dist.sliding_tile_attention(*args, **call, return_lse=True, return_selection=True)
    natural = out if layout == "natural" else sta_dist.to_natural(out, canvas, TILE)
    check = sampled_check(q, k, v, natural, **kw, select=select, window_rule=rule, selection=tiles, n_rows=256)
    assert check["ok"], check
    fixed = dict(call, select=tiles if select is not None else None)
    ref_out, ref_lse = sta_dist.sliding_tile_attention(*args, **fixed, backend="triton", return_lse=True)
    assert max_error(out, ref_out) <= 1e-2
    assert max_error(lse.nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0)) <= 1e-3


def test_key_tables_with_an_empty_row_batch_and_gqa():
    """An explicit tile mask, per sample and head, with a query tile that attends no video
    tile (window None, no text: its rows are 0 and their log-sum-exp -inf), fp16, against
    the float64 reference."""
    canvas, tile = (4, 16, 24), (2, 8, 8)
    n = 2 * 2 * 3
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 4, n, n, generator=g) < 0.3
    mask[0, 1, 3] = False
    mask[1, :, 0, 0] = True
    q = randn((2, math.prod(canvas), 4, 128), torch.float16, 1)
    k, v = (randn((2, math.prod(canvas), 2, 128), torch.float16, s) for s in (2, 3))
    kw = dict(canvas=canvas, tile=tile, window=None, select=mask.cuda())
    assert table_route((q, k, v), canvas, tile, "natural", 0, 0) == "cuda"
    out, lse = sta_dist.sliding_tile_attention(q, k, v, **kw, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, **kw, return_lse=True)
    base = reference_attention(q, k, v, **kw, compute_dtype=torch.float16)
    assert max_error(out, ref) <= error_bound(max_error(base, ref), torch.float16, ref)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)) and torch.isneginf(lse).any()
    assert max_error(lse.nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0)) <= 1e-3


@pytest.mark.parametrize("dtype, excess, v_scale", [(torch.bfloat16, 120.0, 1.0), (torch.float16, 16.0, 1.0),
                                                     (torch.bfloat16, 40.0, 1e25)])
@pytest.mark.parametrize("tt", [2, 6])  # 128-row key blocks, 192-row ones
@pytest.mark.parametrize("resume", [False, True])
def test_a_key_far_above_the_first_block(dtype, excess, v_scale, tt, resume):
    """The fixed reference (each row's exponents against its block-0 maximum) meets a key
    whose score beats that maximum by ``excess`` (natural units): 2^173 overflows fp32,
    2^23 fp16's 65504, and 2^58 stays under the bf16 bound but times values of 1e25 leaves
    fp32's range in O; without the online redo those rows come out inf or NaN. A few
    query rows (2%) point at the key, so some warps of a program pass the bound and others
    do not; resumed, the earlier part's keys (the first tile column) come by the
    log-sum-exp and the hot key sits past the resumed launch's block 0."""
    canvas, tile, windows = (tt, 8, 24), (tt, 8, 8), [(1, 1, 3), (1, 1, 1)]
    n = math.prod(canvas)
    q, k, v = (randn((1, n, 2, 128), dtype, 50 + i) for i in range(3))
    v = v * v_scale
    g = torch.Generator(device="cuda").manual_seed(5)
    u = torch.randn(128, generator=g, device="cuda")
    u = u / u.norm()
    hot_rows = torch.rand(n, generator=g, device="cuda") < 0.02
    q[:, hot_rows] = (u * 128**0.5).to(dtype)
    k[:, 16 + (tt - 1) * 8 * 24] = (u * excess).to(dtype)  # token (tt - 1, 0, 16): the third tile, its last t-slice
    table = head_table(windows, canvas, tile, 2, 2)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 2, n), float("nan"), device="cuda")
    kw = dict(canvas=canvas, tile=tile, scale=128**-0.5, lse=lse)
    if resume:
        launch(q, k, v, table, out, **kw, clip=((0, 0, 0), (1, 1, 1)))
        launch(q, k, v, table, out, **kw, clip=((0, 0, 1), (1, 1, 3)), resume=True)
    else:
        launch(q, k, v, table, out, **kw)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_video_rows_match(q, k, v, out, lse, canvas, tile, windows, dtype=dtype)
