"""The route, on a CPU, for any machine: which kernel each call takes and why the faster ones
do not, from the call's and the device's descriptions (no monkeypatching, no GPU)."""

import dataclasses

import pytest
import torch

from sta_dist.dispatch import describe
from sta_dist.local import LocalHeads, LocalLayout, LocalText
from sta_dist.route import Call, Device, Route, can_run, route

HOPPER = Device.hopper()
CANVAS, TILE = (18, 48, 80), (6, 8, 8)
GRID = (3, 6, 10)
WINDOWS = [(3, 3, 5), (3, 6, 10), (1, 1, 1), (3, 6, 10)]


def hunyuan_call(**change) -> Call:
    """A natural-order bf16 call at Wan's canvas, 256 text rows (200 valid)."""
    n = 18 * 48 * 80
    call = Call(dtype="bfloat16", head_dim=128, canvas=CANVAS, tile=TILE, order="natural", heads=4,
                q_rows=n + 256, kv_rows=n + 256, kv_video=n, text_keys=200, q_text=256, dense_heads=(1, 3))
    return dataclasses.replace(call, **change)


def test_hopper_natural_order_takes_the_cuda_kernel_whole_canvas_heads_included():
    r = route(hunyuan_call(), HOPPER)
    assert r == Route("cuda", "sdpa", (), ())
    assert r.describe() == "video: cuda, text queries: sdpa"


def test_a_log_sum_exp_takes_the_cuda_kernel_and_flash_attention_for_the_text_queries():
    """Text queries whose keys are one range go to SDPA, with the log-sum-exp too (through
    FlashAttention's); keys in two ranges (a rank's box and the text keys it may not count
    twice, when video keys go beyond the box) take the Triton kernel."""
    assert route(hunyuan_call(return_lse=True), HOPPER) == Route("cuda", "sdpa", (), ())
    assert route(hunyuan_call(return_lse=True, text_dense=False), HOPPER) == Route("cuda", "triton", (), ())
    n_box = 3 * 6 * 5 * 384
    box = LocalLayout.packed(CANVAS, TILE, 256, range(90), range(100), text_q_video_keys=n_box)
    heads = LocalHeads.build(WINDOWS, GRID, 4)
    q = torch.empty(1, n_box + 256, 4, 128, dtype=torch.bfloat16)
    kv = torch.empty(1, 100 * 384 + 256, 4, 128, dtype=torch.bfloat16)
    for text, dense in ((LocalText(200, 200, 0), True), (LocalText(200, 200, 200), False)):
        assert describe(q, kv, kv, box, heads, text, return_lse=True).text_dense == dense


def test_a_tile_rank_box_is_packed_tiles_for_the_cuda_kernel():
    r = route(hunyuan_call(order="packed"), HOPPER)
    assert r == Route("cuda", "sdpa", (), ())
    assert route(hunyuan_call(order="packed", tile=(2, 8, 8)), HOPPER).video == "cuda"
    assert dict(route(hunyuan_call(order="packed", tile=(3, 8, 8)), HOPPER).declined)["cuda"] == (
        "reads blocks of 128 rows: tile=(3, 8, 8) does not split into them in packed order")  # 192 rows


def test_key_tables_take_the_cuda_kernel_and_no_head_goes_to_sdpa():
    assert route(hunyuan_call(table=True), HOPPER) == Route("cuda", "sdpa", (), ())
    assert route(hunyuan_call(table=True, order="other"), HOPPER).dense == ()  # a table decides per tile


def test_whole_grid_heads_go_to_sdpa_beside_the_triton_kernel_and_alone():
    r = route(hunyuan_call(order="other"), HOPPER)
    assert (r.video, r.dense) == ("triton", (1, 3))
    assert "heads 1, 3: sdpa (whole grid), other heads: triton" in r.describe()
    r = route(hunyuan_call(order="other", dense_heads=(0, 1, 2, 3)), HOPPER)
    assert (r.video, r.dense) == (None, (0, 1, 2, 3))


@pytest.mark.parametrize("change, reasons", [
    (dict(dtype="float32"), dict(cuda="is built for bfloat16 and float16, got dtype=float32")),
    (dict(head_dim=64), dict(cuda="is built for head dim 128, got head_dim=64")),
    (dict(canvas=(17, 48, 80)), dict(cuda="needs whole tiles: canvas=(17, 48, 80) does not divide by tile=(6, 8, 8)")),
    (dict(order="other"), dict(cuda="reads the natural canvas or whole tiles of consecutive rows, the tokens here "
                                    "are other")),
    (dict(tile=(1, 8, 8), canvas=(18, 48, 80)), dict(cuda="reads blocks of 128 rows: tile=(1, 8, 8) does not split "
                                                          "into them in natural order")),
    (dict(bulk_copy=False), dict(cuda="reads rows through the copy engine: heads must be adjacent and row strides "
                                      "16-byte multiples")),
    (dict(canvas=(6 * 2048, 8 * 32, 8 * 64)), dict(cuda="numbers tiles below 4194304 (its float decode of tile ids), "
                                                        "the grid has 4194304")),
])
def test_what_keeps_a_call_on_the_triton_kernel(change, reasons):
    r = route(hunyuan_call(**change), HOPPER)
    assert r.video == "triton" and r.text is None
    assert r.dense == (1, 3)
    assert [k for k, _ in r.declined] == ["cuda"]
    for kernel, reason in reasons.items():
        assert dict(r.declined)[kernel] == reason


def test_devices():
    assert route(hunyuan_call(), Device("cuda", (8, 0))).declined[0] == ("cuda", "needs Hopper (sm_90), this GPU is sm_80")
    no_nvcc = Device("cuda", (9, 0), cuda_library="needs nvcc to build (set STA_DIST_NVCC, or put nvcc on the PATH)")
    r = route(hunyuan_call(), no_nvcc)
    assert r.video == "triton" and dict(r.declined)["cuda"].startswith("needs nvcc")
    no_triton = dataclasses.replace(no_nvcc, triton="needs the triton package: no module")
    assert route(hunyuan_call(), no_triton).video == "torch"
    r = route(hunyuan_call(), Device.cpu())
    assert r.video == "torch" and dict(r.declined)["cuda"] == "needs a CUDA GPU, the tensors are on cpu"
    assert dict(route(hunyuan_call(dtype="float32"), Device.cpu(interpreter=True)).declined)["triton"].startswith(
        "off a GPU auto takes the torch backend")


def test_an_explicit_kernel_is_taken_or_refused_with_its_reason():
    assert route(hunyuan_call(), HOPPER, "cuda") == Route("cuda", "sdpa")
    assert route(hunyuan_call(return_lse=True), HOPPER, "triton") == Route("triton")
    assert route(hunyuan_call(), Device.cpu(), "torch") == Route("torch")
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run this call: the cuda kernel is built for "
                                         r"bfloat16 and float16, got dtype=float32"):
        route(hunyuan_call(dtype="float32"), HOPPER, "cuda")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: the triton kernel runs bfloat16 "
                                         r"wrongly under the CPU interpreter"):
        route(hunyuan_call(), Device.cpu(interpreter=True), "triton")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cuda', 'triton', 'torch'\), "
                                         r"got backend='flash'"):
        route(hunyuan_call(), HOPPER, "flash")
    assert not can_run("cuda", hunyuan_call(dtype="float32"), HOPPER)


@pytest.mark.parametrize("order, text, lse, expected", [
    ("natural", LocalText.single(200), False, ("cuda", "sdpa", ())),
    ("natural", LocalText.single(200), True, ("cuda", "sdpa", ())),  # the log-sum-exp from FlashAttention
    ("tiled", LocalText.single(200), False, ("cuda", "sdpa", ())),
    ("tiled", LocalText(200, 200, 0), False, ("cuda", "sdpa", ())),  # text keys counted elsewhere: video keys alone
])
def test_described_from_real_tensors(order, text, lse, expected):
    """``describe`` reads the tensors and the layout; the route is then Hopper's."""
    layout = getattr(LocalLayout, order)(CANVAS, TILE, 256)
    q, k, v = (torch.empty(1, 18 * 48 * 80 + 256, 4, 128, dtype=torch.bfloat16) for _ in range(3))
    heads = LocalHeads.build(WINDOWS, GRID, 4)
    r = route(describe(q, k, v, layout, heads, text, return_lse=lse), HOPPER)
    assert (r.video, r.text, r.dense) == expected


def test_strided_views_of_one_projection_still_bulk_copy_but_a_gap_between_heads_does_not():
    qkv = torch.empty(1, 18 * 48 * 80, 3, 4, 128, dtype=torch.bfloat16)
    layout = LocalLayout.natural(CANVAS, TILE, 0)
    heads = LocalHeads.build([(3, 3, 3)] * 4, GRID, 4)
    assert describe(*qkv.unbind(2), layout, heads, LocalText.single(0)).bulk_copy
    padded = torch.empty(1, 18 * 48 * 80, 4, 136, dtype=torch.bfloat16)[..., :128]
    call = describe(padded, padded, padded, layout, heads, LocalText.single(0))
    assert not call.bulk_copy and route(call, HOPPER).video == "triton"
