"""Every registered kernel against the one reference, on every case it claims: random
problems in fp32 and fp16 (odd canvases, partial tiles, GQA, text, batch) and the Hopper
kernel's shapes in bf16 and fp16. A kernel that declines a case says why (the test is skipped with
that reason: on a CPU the CUDA kernel declines them all)."""

import pytest
import torch

import sta_dist
from sta_dist.route import KERNELS
from sta_dist.testing import error_bound, max_error, reference_attention
from tests.cases import Case, random_case
from tests.hopper_support import box_and_halo

SEEDS = range(24)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HOPPER_CASES = {  # whole tiles of 128-row blocks, head dim 128: what the CUDA kernel claims
    "hopper-text": (Case((4, 16, 24), (2, 8, 8), [(1, 1, 1), (2, 2, 3), (1, 2, 1), (2, 2, 3)], 40, 33, 1, 4, 2, 128),
                    torch.bfloat16),
    "hopper-batch2": (Case((4, 16, 16), (2, 8, 8), (1, 1, 2), 0, 0, 2, 2, 2, 128), torch.bfloat16),
    "hopper-fp16-4x8": (Case((8, 8, 16), (4, 4, 8), [(2, 1, 1), (1, 2, 2)], 24, 20, 1, 2, 1, 128), torch.float16),
}
CASES = {f"seed{s}-{d}": (random_case(s, max_tile_pairs=2000), getattr(torch, d), s)
         for s in SEEDS for d in ("float32", "float16")}
CASES.update({name: (case, dtype, i) for i, (name, (case, dtype)) in enumerate(HOPPER_CASES.items())})


def check_backend(case: Case, backend: str, dtype: torch.dtype, seed: int, return_lse: bool = True) -> None:
    q, k, v = case.tensors(dtype, device=DEVICE, seed=seed)
    ref, ref_lse = reference_attention(q, k, v, **case.kwargs(), return_lse=True)
    base = reference_attention(q, k, v, **case.kwargs(), compute_dtype=dtype)
    result = sta_dist.sliding_tile_attention(q, k, v, **case.kwargs(), backend=backend, return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    assert out.dtype == dtype and out.shape == q.shape
    err, bound = max_error(out, ref), error_bound(max_error(base, ref), dtype, ref)
    assert err <= bound, f"{case}: error {err:.3g} > bound {bound:.3g}"
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        lse_tol = 1e-5 if dtype == torch.float32 else 1e-3
        assert max_error(lse[finite], ref_lse[finite]) <= lse_tol


@pytest.mark.parametrize("case_id", list(CASES))
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_reference_on_every_case_it_claims(kernel, case_id):
    """Output and log-sum-exp; a kernel that declines the case is skipped with its reason."""
    case, dtype, seed = CASES[case_id]
    q, k, v = case.tensors(dtype, device=DEVICE, seed=seed)
    try:
        sta_dist.route_of(q, k, v, **case.kwargs(), backend=kernel, return_lse=True)
    except ValueError as refusal:
        pytest.skip(str(refusal))
    check_backend(case, kernel, dtype, seed)


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_every_head_dim(head_dim):
    case = Case((3, 5, 4), (2, 2, 3), [(1, 2, 1), (2, 3, 9)], 6, 4, 1, 2, 1, head_dim)
    for backend in ("torch", "triton"):
        check_backend(case, backend, torch.float16, head_dim)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tiled_layout_equals_natural(backend):
    case = random_case(7)
    q, k, v = case.tensors(torch.float32, device=DEVICE)
    natural = sta_dist.sliding_tile_attention(q, k, v, **case.kwargs(), backend=backend)
    tiled_in = [sta_dist.to_tiled(x, case.canvas, case.tile) for x in (q, k, v)]
    tiled = sta_dist.sliding_tile_attention(*tiled_in, **case.kwargs(), backend=backend, layout="tiled")
    assert max_error(sta_dist.to_natural(tiled, case.canvas, case.tile), natural) <= 1e-5


def test_strided_inputs_need_no_copy():
    """q, k, v as views of one packed qkv projection: the kernel reads them by stride."""
    case = Case((4, 4, 6), (2, 2, 3), (2, 1, 3), 5, 5, 2, 2, 2, 32)
    qkv = torch.randn(case.batch, case.seq, 3, case.heads, case.head_dim, device=DEVICE)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    ref = reference_attention(q, k, v, **case.kwargs())
    base = reference_attention(q, k, v, **case.kwargs(), compute_dtype=torch.float32)
    out = sta_dist.sliding_tile_attention(q, k, v, **case.kwargs(), backend="triton")
    assert max_error(out, ref) <= error_bound(max_error(base, ref), torch.float32, ref)


def test_auto_backend_on_cpu_is_torch():
    q = torch.randn(1, 8, 1, 32)
    assert sta_dist.dispatch.choose_backend(q, "auto") == "torch"


def test_padding_text_rows_are_zero():
    case = Case((2, 4, 4), (2, 2, 2), (1, 1, 1), 8, 3, 1, 2, 2, 32)
    q, k, v = case.tensors(device=DEVICE)
    for backend in ("torch", "triton"):
        out = sta_dist.sliding_tile_attention(q, k, v, **case.kwargs(), backend=backend)
        assert torch.count_nonzero(out[:, 32 + 3 :]) == 0
        assert torch.count_nonzero(out[:, : 32 + 3]) == out[:, : 32 + 3].numel()


def test_layout_hash_is_cached_and_follows_every_field():
    """Layouts key the backends' caches; the hash is computed once, from every compared field."""
    import dataclasses

    from sta_dist.local import LocalLayout

    a, b = (LocalLayout.natural((4, 8, 12), (2, 4, 4), 3) for _ in range(2))
    assert a is not b and a == b and hash(a) == hash(b)
    for change in (dict(q_text=4), dict(kv_video=a.kv_video + 1), dict(q_tiles=a.q_tiles[::-1])):
        other = dataclasses.replace(a, **change)
        assert other != a and hash(other) != hash(a), change
    assert "_hash" not in repr(a)


def test_layout_facts_and_dense_routing_choice():
    """What decides the GPU paths (bulk copies, whole-canvas heads to cuDNN), checked on CPU."""
    from sta_dist.local import LocalHeads, LocalLayout, LocalText
    from sta_dist.kernel_calls import dense_heads, layout_facts

    canvas, tile, cpu = (4, 8, 12), (2, 4, 4), torch.device("cpu")
    natural = layout_facts(LocalLayout.natural(canvas, tile, 3), cpu)
    assert (natural.natural, natural.packed, natural.even, natural.complete) == (True, False, True, True)
    tiled = layout_facts(LocalLayout.tiled(canvas, tile, 3), cpu)
    assert (tiled.natural, tiled.packed, tiled.complete) == (False, True, True)
    box = LocalLayout.packed(canvas, tile, 3, q_tiles=[0, 1], kv_tiles=[0, 1, 2], text_q_video_keys=64)
    assert not layout_facts(box, cpu).complete
    assert not layout_facts(LocalLayout.natural((5, 8, 12), tile, 0), cpu).even
    heads = LocalHeads.build([(9, 9, 9), (1, 1, 1), (2, 2, 3)], (2, 2, 3), 3)
    assert dense_heads(LocalLayout.natural(canvas, tile, 3), heads, LocalText.single(2), True) == (0, 2)
    assert dense_heads(LocalLayout.natural(canvas, tile, 3), heads, LocalText(2, 2, 0), True) == ()
    assert dense_heads(box, heads, LocalText.single(2), False) == ()


def _rank_problem(backend: str, seed: int):
    """A tile-mode rank's local problem for ``backend`` (skipped without a Hopper GPU for
    "cuda"): ``(hopper, canvas, tile, text, (q, k, v), layout, halo tiles)``."""
    hopper = backend == "cuda"
    if hopper and not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("the CUDA kernel needs a Hopper GPU")
    canvas, tile, text = ((4, 16, 24), (2, 8, 8), 40) if hopper else ((4, 5, 9), (2, 3, 3), 7)
    dtype = torch.bfloat16 if hopper else torch.float32
    _, qkv, layout, _ = box_and_halo(canvas, tile, text, seed=seed, dtype=dtype, device=DEVICE)
    halo_tiles = tuple(t for t, r in enumerate(layout.kv_rows) if r is not None and t not in layout.q_tiles)
    return hopper, canvas, tile, text, qkv, layout, halo_tiles


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_keys_in_parts_fold_into_the_whole_call(backend):
    """A query's window in parts (:attr:`LocalLayout.key_box`): the box's keys with the text,
    then the halo's, folded in by the log-sum-exp (``resume=True``: the CUDA kernel in its
    launch, the others by the merge), equal the call over all keys at once; the halo read
    where it lies. Windows: local, reaching the halo, and the whole canvas."""
    from sta_dist.dispatch import call_route, run_local
    from sta_dist.local import Halo, LocalHeads, LocalText
    from sta_dist.parallel.schedule import split_keys

    hopper, canvas, tile, text, (q, k, v), layout, halo_tiles = _rank_problem(backend, seed=3)
    heads = LocalHeads.build([(1, 1, 1), (2, 1, 3), (1, 2, 2), (9, 9, 9)], layout.grid, 4)
    n_box, n_kv = layout.q_video, layout.kv_video
    kernel = "auto" if hopper else backend
    whole, whole_lse = run_local(q, k, v, layout, heads, LocalText(text, text - 2, text - 2), 128**-0.5, kernel, True)
    split = split_keys(layout, tuple(sorted(set(heads.windows))), ((), halo_tiles))
    assert len(split.halo) == 1 and split.halo[0].q_tiles
    kb, vb = (torch.cat([x[:, :n_box], x[:, n_kv:]], 1) for x in (k, v))
    apart = Halo(k[:, n_box:n_kv], v[:, n_box:n_kv], n_box)
    out, lse = run_local(q, kb, vb, split.own, heads, LocalText(text, text - 2, text - 2), 128**-0.5, kernel, True)
    if hopper:
        assert call_route(q, kb, vb, split.halo[0], heads, LocalText(0, 0, 0), kernel, True, halo=apart).video == "cuda"
    out, lse = run_local(q, kb, vb, split.halo[0], heads, LocalText(0, 0, 0), 128**-0.5, kernel, out=out, lse=lse,
                         resume=True, halo=apart)
    rows = slice(0, n_box + text)
    tol = 2 ** -7 if hopper else 1e-5  # bf16: the box part is rounded once before the fold
    assert max_error(out[:, rows], whole[:, rows]) <= tol * whole[:, rows].abs().max()
    assert max_error(lse[:, :, rows], whole_lse[:, :, rows]) <= (1e-3 if hopper else 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_key_lists_in_parts_fold_into_the_whole_lists(backend):
    """Selected tiles in parts (a tile-mode rank's call): each query tile's listed key tiles
    of its own box with the text first, then the listed tiles of the halo folded in
    (``resume=True`` with ``keys=``), the halo read where it lies, equal one call over the
    whole lists. Per-head lists, some query tiles with no halo tile listed."""
    from sta_dist.dispatch import call_route, run_local
    from sta_dist.local import Halo, LocalHeads, LocalLayout, LocalText
    from sta_dist.selection.tables import key_tiles

    hopper, canvas, tile, text, (q, k, v), layout, halo_tiles = _rank_problem(backend, seed=5)
    n, n_box, n_kv = len(layout.kv_rows), layout.q_video, layout.kv_video
    held = torch.tensor([r is not None for r in layout.kv_rows], device=DEVICE)
    in_box = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    in_box[list(layout.q_tiles)] = True
    g = torch.Generator(device=DEVICE).manual_seed(0)
    attended = (torch.rand(1, 4, len(layout.q_tiles), n, generator=g, device=DEVICE) < 0.5) & held
    attended[:, :, 0] &= in_box  # query tile 0 lists no halo tile
    heads = LocalHeads.build([(1, 1, 1)] * 4, layout.grid, 4)
    kernel = "auto" if hopper else backend
    full = LocalText(text, text - 2, text - 2)
    whole, whole_lse = run_local(q, k, v, layout, heads, full, 128**-0.5, kernel, True, keys=key_tiles(attended, n))
    box_only = LocalLayout.packed(canvas, tile, text, layout.q_tiles, layout.q_tiles, text_q_video_keys=n_box)
    kb, vb = (torch.cat([x[:, :n_box], x[:, n_kv:]], 1) for x in (k, v))
    apart = Halo(k[:, n_box:n_kv], v[:, n_box:n_kv], n_box)
    out, lse = run_local(q, kb, vb, box_only, heads, full, 128**-0.5, kernel, True,
                         keys=key_tiles(attended & in_box, n))
    remote = key_tiles(attended & ~in_box, n)
    videos = LocalLayout.packed(canvas, tile, 0, layout.q_tiles, layout.q_tiles + halo_tiles, n_box)  # no text rows
    if hopper:
        assert call_route(q, kb, vb, videos, heads, LocalText(0, 0, 0), kernel, True, True, halo=apart).video == "cuda"
    with pytest.raises(ValueError, match=r"resume=True folds keys into video query rows; the layout must have no "
                                         r"text query rows, got q_text=" + str(text)):
        run_local(q, kb, vb, layout, heads, LocalText(0, 0, 0), 1.0, kernel, keys=remote, out=out, lse=lse,
                  resume=True, halo=apart)
    out, lse = run_local(q, kb, vb, videos, heads, LocalText(0, 0, 0), 128**-0.5, kernel, keys=remote, out=out,
                         lse=lse, resume=True, halo=apart)
    rows = slice(0, n_box + text)
    tol = 2 ** -7 if hopper else 1e-5  # bf16: the box part is rounded once before the fold
    assert max_error(out[:, rows], whole[:, rows]) <= tol * whole[:, rows].abs().max()
    assert max_error(lse[:, :, rows], whole_lse[:, :, rows]) <= (1e-3 if hopper else 1e-5)
