"""Bad input gets a clear error naming the argument, the rule and the value."""

import pytest
import torch

import sta_dist
from sta_dist import SlidingTileAttentionImpl

CANVAS, TILE = (2, 4, 4), (2, 2, 2)


def qkv(S=32 + 4, H=2, Hkv=2, D=32, dtype=torch.float32, B=1):
    return (torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, S, Hkv, D, dtype=dtype),
            torch.randn(B, S, Hkv, D, dtype=dtype))


def call(q, k, v, **kw):
    args = dict(canvas=CANVAS, tile=TILE, window=(1, 1, 1))
    args.update(kw)
    return sta_dist.sliding_tile_attention(q, k, v, **args)


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, S, H, D\], got q.dim\(\)=3"):
        call(q[0], k, v)


def test_mismatched_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):
        call(q, k, v[:, :-1])
    with pytest.raises(ValueError, match=r"k/v must be \[B, S, Hkv, D\] with q's B, S and D"):
        call(q, k[:, :-1], v[:, :-1])


def test_seq_len_not_canvas_plus_text():
    q, k, v = qkv(S=20)
    with pytest.raises(ValueError, match=r"S must be T\*H\*W \+ L with L >= 0: canvas=\(2, 4, 4\) has 32 video tokens, got S=20"):
        call(q, k, v)


def test_window_count_must_match_heads():
    q, k, v = qkv(H=2)
    with pytest.raises(ValueError, match=r"expected 2 windows, got len\(window\)=3"):
        call(q, k, v, window=[(1, 1, 1)] * 3)


def test_window_entry_below_one():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"window entries must all be >= 1, got window=\[1, 0, 1\]"):
        call(q, k, v, window=[1, 0, 1])
    with pytest.raises(ValueError, match=r"window\[1\] entries must all be >= 1"):
        call(q, k, v, window=[(1, 1, 1), (1, -1, 1)])


def test_gqa_heads_must_divide():
    q, k, v = qkv(H=3, Hkv=2)
    with pytest.raises(ValueError, match=r"H % Hkv == 0\), got H=3, Hkv=2"):
        call(q, k, v)


@pytest.mark.parametrize("bad", [-1, 5])
def test_text_length_range(bad):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"text_length must be an int in \[0, L\] = \[0, 4\], got text_length={bad}"):
        call(q, k, v, text_length=bad)


def test_unsupported_head_dim():
    q, k, v = qkv(D=48)
    with pytest.raises(ValueError, match=r"head dim must be one of \(32, 64, 96, 128, 160, 192, 224, 256\), got head_dim=48"):
        call(q, k, v)
    with pytest.raises(ValueError, match=r"got head_dim=80"):
        SlidingTileAttentionImpl(2, 80, False, None)


CAUSAL = r"^causal must be False: sliding tile attention is bidirectional within its 3-D window, got causal=True$"


def test_causal_refused_by_every_entry_that_takes_it():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=CAUSAL):
        SlidingTileAttentionImpl(2, 64, True, None)
    with pytest.raises(ValueError, match=CAUSAL):
        call(q, k, v, causal=True)
    with pytest.raises(ValueError, match=CAUSAL):
        sta_dist.route_of(q, k, v, canvas=CANVAS, tile=TILE, window=(1, 1, 1), causal=True)
    assert call(q, k, v, causal=False).shape == q.shape


def test_route_of_names_the_kernel_of_the_text_rows():
    """On a CPU the torch backend takes the whole call, text rows too: ``text`` says so."""
    q, k, v = qkv()
    route = sta_dist.route_of(q, k, v, canvas=CANVAS, tile=TILE, window=(1, 1, 1))
    assert (route.video, route.text) == ("torch", "torch")
    assert route.describe().startswith("video: torch, text queries: torch (not cuda: ")
    no_text = sta_dist.route_of(q, k, v, canvas=CANVAS, tile=TILE, window=(1, 1, 1), text_length=0)
    assert (no_text.video, no_text.text) == ("torch", None)


def test_mismatched_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q, k, v must share one dtype, got q.dtype=torch.float16"):
        call(q.half(), k, v)
    with pytest.raises(TypeError, match=r"dtype must be one of float16, bfloat16, float32, got q.dtype=torch.float64"):
        call(q.double(), k.double(), v.double())


def test_mismatched_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q, k, v must be on one device, got q.device=meta"):
        call(q.to("meta"), k, v)


def test_bad_tile_and_canvas():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"tile entries must all be >= 1, got tile=\(0, 2, 2\)"):
        call(q, k, v, tile=(0, 2, 2))
    with pytest.raises(ValueError, match=r"canvas must be 3 ints \(t, h, w\), got canvas=\(2, 4\)"):
        call(q, k, v, canvas=(2, 4))


def test_bad_backend_and_layout():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cuda', 'triton', 'torch'\), "
                                         r"got backend='cudnn'"):
        call(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match=r"layout must be 'natural' or 'tiled', got layout='rows'"):
        call(q, k, v, layout="rows")


def test_bad_scale():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"scale must be a finite float > 0, got scale=-1.0"):
        call(q, k, v, scale=-1.0)


def test_triton_refused_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv()
    if q.is_cuda:
        pytest.skip("CPU tensors only")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here: the triton kernel needs CUDA tensors "
                                         r".* the tensors are on cpu"):
        call(q, k, v, backend="triton")
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run this call: the cuda kernel needs a CUDA GPU, "
                                         r"the tensors are on cpu"):
        call(q, k, v, backend="cuda")


def impl_call(impl, q, k, v):
    meta = sta_dist.SlidingTileAttentionMetadata(current_timestep=0, STA_param=[[(1, 1, 1)] * q.shape[2]],
                                                 canvas=CANVAS, tile=TILE)
    return impl.forward(q, k, v, meta)


def test_impl_checks_head_size_and_counts_against_the_tensors():
    q, k, v = qkv(H=4, Hkv=2, D=64)
    with pytest.raises(ValueError, match=r"must have num_heads=4, num_kv_heads=2 and head_size=32 \(the Impl's\), "
                                         r"got q.shape=\(1, 36, 4, 64\)"):
        impl_call(SlidingTileAttentionImpl(num_heads=4, head_size=32, causal=False, softmax_scale=None,
                                           num_kv_heads=2), q, k, v)
    with pytest.raises(ValueError, match=r"must have num_heads=2, num_kv_heads=2 and head_size=64"):
        impl_call(SlidingTileAttentionImpl(num_heads=2, head_size=64, causal=False, softmax_scale=None), q, k, v)
    with pytest.raises(ValueError, match=r"must have num_heads=4, num_kv_heads=4 and head_size=64"):
        impl_call(SlidingTileAttentionImpl(num_heads=4, head_size=64, causal=False, softmax_scale=None), q, k, v)


@pytest.mark.parametrize("window, error, message", [
    ((1.5, 1, 1), ValueError, r"window must be 3 ints \(t, h, w\), got window=\[1.5, 1, 1\]"),
    (3, TypeError, r"window must be \(kt, kh, kw\) in tiles or one such triple per query head, got window=3"),
    ("333", TypeError, r"got window='333'"),
    ([(1, 1, 1), (1, 1)], ValueError, r"window\[1\] must be 3 ints \(t, h, w\), got window\[1\]=\(1, 1\)"),
])
def test_window_messages_say_what_is_wrong(window, error, message):
    q, k, v = qkv()
    with pytest.raises(error, match=message):
        call(q, k, v, window=window)
