"""What sta_dist is measured against, run in the same process: FlexAttention with an STA
block mask (its Triton kernel, or FlashAttention-4's through its FLASH backend), PyTorch
SDPA dense attention (cuDNN, flash), and FlashAttention-4 called directly (dense, or
block-sparse over the same block mask).

FlexAttention gets its best case: tokens in tiled order, so a 6x8x8 tile is three whole
128-token blocks and the block mask is exact. Inputs are ``[B, H, S, D]``, except FA4's
own ``[B, S, H, D]``. FlashAttention-4 (``flash_attn.cute``, package flash-attn-4) is
optional and imported lazily: without it its anchors raise ImportError saying so.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import geometry
from ..geometry import Triple


def _tile_coords_per_token(canvas: Triple, tile: Triple, pad_to: int, device) -> torch.Tensor:
    """``[3, pad_to]`` tile coordinate of each token in tiled order (text/pad: -1)."""
    pos = geometry.packed_positions(canvas, tile, range(geometry.num_tiles(geometry.grid_shape(canvas, tile))))
    coords = torch.full((3, pad_to), -1, dtype=torch.long)
    coords[:, : len(pos)] = (pos // torch.tensor(tile)).T
    return coords.to(device)


@functools.lru_cache(maxsize=1)
def fa4_missing() -> Optional[str]:
    """None when FlashAttention-4's CuTe-DSL interface (``flash_attn.cute``) imports, else
    why not, starting "not installed"."""
    try:
        importlib.import_module("flash_attn.cute")
    except Exception as err:  # ImportError, or a CuTe-DSL library that fails to load
        return f"not installed ({type(err).__name__}: {str(err)[:200]})"
    return None


def _need_fa4(what: str) -> None:
    if fa4_missing():
        raise ImportError(f"{what}: FlashAttention-4 (flash_attn.cute) {fa4_missing()}")


def _with_text(inside, q_idx, kv_idx, n_video: int, text_valid: int):
    """An STA ``mask_mod``'s value from ``inside`` (the key tile is in the query tile's
    window): video queries see their window's video keys and the valid text, valid text
    queries see every video key and the valid text."""
    k_video = kv_idx < n_video
    k_text = (kv_idx >= n_video) & (kv_idx < n_video + text_valid)
    q_video = q_idx < n_video
    q_text = (q_idx >= n_video) & (q_idx < n_video + text_valid)
    return (q_video & ((inside & k_video) | k_text)) | (q_text & (k_video | k_text))


class FlexSTA:
    """FlexAttention with an STA block mask for tiled-order ``q, k, v [B, H, S, D]``.

    One compiled function and one ``mask_mod`` per problem shape; :meth:`set_windows`
    changes the windows in place (no recompilation). With one window for all heads the
    block mask broadcasts over heads unless ``per_head_mask``.

    ``backend`` is FlexAttention's ``kernel_options["BACKEND"]``: None leaves its default
    (the Triton kernel); ``"FLASH"`` runs FlashAttention-4's CuTe-DSL forward kernel with
    the same block mask (its full blocks unmasked, the ``mask_mod`` compiled to CuTe-DSL
    for the partial ones; see :meth:`_make_flash_mask_mod`), and raises ImportError here
    without FA4.
    """

    BLOCK = 128

    def __init__(self, canvas: Triple, tile: Triple, text_len: int, text_valid: int, heads: int, device,
                 backend: Optional[str] = None):
        from torch.nn.attention.flex_attention import flex_attention

        if backend == "FLASH":
            _need_fa4("FlexAttention BACKEND=FLASH")
        self.kernel_options = None if backend is None else {"BACKEND": backend}
        self.canvas, self.tile, self.heads, self.device = canvas, tile, heads, device
        self.grid = geometry.grid_shape(canvas, tile)
        self.n_video = geometry.volume(canvas)
        self.text_len, self.text_valid = text_len, text_valid
        self.seq = self.n_video + text_len
        self.coords = _tile_coords_per_token(canvas, tile, self.seq + 2 * self.BLOCK, device)
        self.eff = torch.ones(3, heads, dtype=torch.long, device=device)  # [axis, head]
        self.n_tiles = torch.tensor(self.grid, device=device)
        # FLASH's mask_mod: per axis, each token's tile coordinate and each head's width.
        self.axis_coords = [c.to(torch.int32).contiguous() for c in self.coords]
        self.axis_eff = [torch.ones(heads, dtype=torch.int32, device=device) for _ in range(3)]
        self.axis_half = [torch.zeros(heads, dtype=torch.int32, device=device) for _ in range(3)]
        self.axis_last = [torch.zeros(heads, dtype=torch.int32, device=device) for _ in range(3)]
        # Static shapes: torch.compile caches per code object, so a second problem shape in the
        # same process would otherwise recompile flex_attention with dynamic sizes, which ran
        # about 22% slower on an H100 (a bench's later cases met a weakened anchor).
        self.compiled = torch.compile(flex_attention, dynamic=False)
        self.mask_mod = self._make_flash_mask_mod() if backend == "FLASH" else self._make_mask_mod()
        self.block_mask = None
        self._keys: dict = {}

    def _make_mask_mod(self):
        coords, eff, n_tiles = self.coords, self.eff, self.n_tiles
        n_video, text_valid = self.n_video, self.text_valid

        def sta_mask_mod(b, h, q_idx, kv_idx):
            inside = q_idx < n_video
            for a in range(3):
                k = eff[a][h]
                start = torch.clamp(coords[a][q_idx] - (k - 1) // 2, min=0)
                start = torch.minimum(start, n_tiles[a] - k)
                inside = inside & (coords[a][kv_idx] >= start) & (coords[a][kv_idx] < start + k)
            return _with_text(inside, q_idx, kv_idx, n_video, text_valid)

        return sta_mask_mod

    def _make_flash_mask_mod(self):
        """The same mask in the form the FLASH backend compiles to CuTe-DSL (torch 2.11):
        captured tensors loaded only at indices computed from ``h``, ``q_idx``, ``kv_idx``
        (a constant index, as in ``coords[a][q_idx]``, fails in its codegen), so each axis
        has its own int32 coordinate and width tensors and the tile counts are constants."""
        axes = list(zip(self.axis_coords, self.axis_eff, self.axis_half, self.axis_last))
        n_video, text_valid = self.n_video, self.text_valid

        def sta_mask_mod(b, h, q_idx, kv_idx):
            inside = q_idx < n_video
            for coord, eff, half, last in axes:  # no min/max: its CuTe-DSL codegen lacks them
                start = coord[q_idx] - half[h]
                start = torch.where(start < 0, 0, start)
                start = torch.where(start > last[h], last[h], start)
                inside = inside & (coord[kv_idx] >= start) & (coord[kv_idx] < start + eff[h])
            return _with_text(inside, q_idx, kv_idx, n_video, text_valid)

        return sta_mask_mod

    def set_windows(self, windows: Sequence[Triple], per_head_mask: bool | None = None) -> "FlexSTA":
        per_head = len(set(windows)) > 1 if per_head_mask is None else per_head_mask
        eff = [geometry.effective_window(w, self.grid) for w in windows]
        self.eff.copy_(torch.tensor(eff if per_head else eff[:1] * self.heads).T)
        for axis_eff, half, last, row, n in zip(self.axis_eff, self.axis_half, self.axis_last, self.eff, self.grid):
            axis_eff.copy_(row)
            half.copy_((row - 1) // 2)  # a window's first tile: the query's minus half, within [0, n - k]
            last.copy_(n - row)
        self.block_mask = self._block_mask(eff, per_head)
        return self

    def _block_mask(self, eff, per_head: bool):
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask

        vol = geometry.volume(self.tile)
        if vol % self.BLOCK or any(c % t for c, t in zip(self.canvas, self.tile)):
            return create_block_mask(self.mask_mod, None, self.heads if per_head else None, self.seq, self.seq,
                                     device=self.device, _compile=True)
        # Whole tiles of whole blocks: every video block pair is full or empty; only the
        # text blocks are partial. Built from the tile windows directly.
        per_tile, n_tiles = vol // self.BLOCK, geometry.num_tiles(self.grid)
        n_video_blocks = n_tiles * per_tile
        n_text_blocks = -(-self.text_len // self.BLOCK)
        n_valid_text_blocks = -(-self.text_valid // self.BLOCK)
        heads = eff if per_head else eff[:1]
        # Index rows as wide as there are kv blocks (what BlockMask expects).
        text_width = n_video_blocks + n_text_blocks
        f_num = torch.zeros(1, len(heads), n_video_blocks + n_text_blocks, dtype=torch.int32)
        f_idx = torch.zeros(1, len(heads), n_video_blocks + n_text_blocks, text_width, dtype=torch.int32)
        for h, window in enumerate(heads):
            keys = self._window_keys(window)
            blocks = (keys[:, :, None] * per_tile + torch.arange(per_tile)).reshape(n_tiles, -1)
            f_num[0, h, :n_video_blocks] = blocks.shape[1]
            f_idx[0, h, :n_video_blocks, : blocks.shape[1]] = blocks.repeat_interleave(per_tile, 0)
            f_num[0, h, n_video_blocks:] = n_video_blocks
            f_idx[0, h, n_video_blocks:, :n_video_blocks] = torch.arange(n_video_blocks)
        # Text key blocks are partial (valid length, padding): the mask_mod decides there.
        p_num = torch.full_like(f_num, n_valid_text_blocks)
        p_idx = torch.zeros(1, len(heads), n_video_blocks + n_text_blocks, text_width, dtype=torch.int32)
        p_idx[..., :n_valid_text_blocks] = torch.arange(n_video_blocks, n_video_blocks + n_valid_text_blocks,
                                                        dtype=torch.int32)
        # Text query blocks whose rows are all padding attend nothing.
        first_pad_q_block = n_video_blocks + self.text_valid // self.BLOCK + (1 if self.text_valid % self.BLOCK else 0)
        f_num[..., first_pad_q_block:] = 0
        p_num[..., first_pad_q_block:] = 0
        to = dict(device=self.device)
        return BlockMask.from_kv_blocks(p_num.to(**to), p_idx.to(**to), f_num.to(**to), f_idx.to(**to),
                                        BLOCK_SIZE=self.BLOCK, mask_mod=self.mask_mod,
                                        seq_lengths=(self.seq, self.seq))

    def _window_keys(self, window: Triple) -> torch.Tensor:
        """``[n_tiles, n_window_tiles]`` key tile ids of every query tile (memoised)."""
        if window not in self._keys:
            self._keys[window] = torch.tensor([geometry.window_tiles(geometry.tile_coords(t, self.grid), window, self.grid)
                                               for t in range(geometry.num_tiles(self.grid))])
        return self._keys[window]

    def __call__(self, q, k, v):
        return self.compiled(q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1],
                             kernel_options=self.kernel_options)


class FA4:
    """FlashAttention-4 called directly (``flash_attn.cute.flash_attn_func``) on ``q, k, v
    [B, S, H, D]``: dense, or block-sparse given a FlexAttention ``BlockMask`` (FlexSTA's,
    tokens in tiled order) passed as FA4's ``BlockSparseTensorsTorch``, what the FLASH
    backend hands it too. Only a mask whose blocks are all full or empty: FA4 masks inside
    a partial block only with a CuTe-DSL ``mask_mod``, which a torch ``mask_mod`` is not
    until FlexAttention compiles it; so whole tiles of whole 128-token blocks, no text."""

    def __init__(self, block_mask=None):
        _need_fa4("FA4")
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        self.fn, self.sparse = flash_attn_func, None
        if block_mask is not None:
            if block_mask.full_kv_num_blocks is None or bool(block_mask.kv_num_blocks.any()):
                raise ValueError("FA4 block-sparse here needs every block full or empty (no partial blocks: "
                                 "those need a CuTe-DSL mask_mod)")
            self.sparse = BlockSparseTensorsTorch(
                block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                block_mask.full_kv_indices, block_size=tuple(block_mask.BLOCK_SIZE))

    def __call__(self, q, k, v):
        out = self.fn(q, k, v, block_sparse_tensors=self.sparse)
        return out[0] if isinstance(out, tuple) else out


def sdpa(backend: str) -> Callable:
    """Dense attention through one SDPA backend: ``"cudnn"`` or ``"flash"``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v)

    return run


class FlexTileLists:
    """FlexAttention for tiled-order ``q, k, v [B, H, S, D]`` with a block mask built per
    call from each query tile's key-tile lists (``sta_dist.selection.tables.KeyTiles``):
    what a caller of FlexAttention pays for window plus selected tiles. Needs whole tiles
    of whole 128-token blocks, so every video block pair is full or empty and only text
    blocks are partial. The ``mask_mod`` is the whole token mask (the attended tiles, the
    text rule), so eager FlexAttention (``compile=False``, CPU tests), which evaluates it
    everywhere, computes the same attention as the compiled kernel, which evaluates it on
    the partial blocks only."""

    BLOCK = 128

    def __init__(self, canvas: Triple, tile: Triple, text_len: int, text_valid: int, compile: bool = True):
        import inspect

        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        vol = geometry.volume(tile)
        if vol % self.BLOCK or any(c % t for c, t in zip(canvas, tile)):
            raise ValueError(f"FlexTileLists needs whole tiles of whole {self.BLOCK}-token blocks, got "
                             f"canvas={canvas}, tile={tile}")
        self.vol, self.per_tile = vol, vol // self.BLOCK
        self.n_tiles = geometry.num_tiles(geometry.grid_shape(canvas, tile))
        self.n_video = geometry.volume(canvas)
        self.seq = self.n_video + text_len
        self.valid = self.n_video + text_valid
        self.text_blocks = -(-text_len // self.BLOCK)
        self.valid_text_blocks = -(-text_valid // self.BLOCK)
        self.flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
        self._from_kv_blocks = BlockMask.from_kv_blocks
        # Forward only: skip the transposed (query-block) index the backward pass needs.
        self._forward_only = ({"compute_q_blocks": False}
                              if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters else {})
        self._tiles = None  # [Bk, Hk, n, n] bool, refilled per call: the mask_mod reads it
        self._mask_mod = None

    def _make_mask_mod(self, attended: torch.Tensor):
        self._tiles = torch.zeros_like(attended)
        tiles, vol, n, n_video, valid = self._tiles, self.vol, self.n_tiles, self.n_video, self.valid
        per_sample, per_head = attended.shape[0] > 1, attended.shape[1] > 1

        def mask_mod(b, h, q_idx, kv_idx):
            q_video, kv_video = q_idx < n_video, kv_idx < n_video
            qt, kt = torch.clamp(q_idx // vol, max=n - 1), torch.clamp(kv_idx // vol, max=n - 1)
            chosen = tiles[b if per_sample else b * 0, h if per_head else h * 0, qt, kt]
            video_q = q_video & ((kv_video & chosen) | (~kv_video & (kv_idx < valid)))
            return video_q | (~q_video & (q_idx < valid) & (kv_idx < valid))

        self._mask_mod = mask_mod

    def block_mask(self, keys, attended: torch.Tensor):
        """The BlockMask of ``keys`` (``keys [Bk, Hk, n, width]``, ``counts [Bk, Hk, n]``)
        and of the same tiles as a mask, ``attended [Bk, Hk, n, n]``."""
        if self._tiles is None or self._tiles.shape != attended.shape:
            self._make_mask_mod(attended)
        self._tiles.copy_(attended)
        k, c = keys.keys.long(), keys.counts.long()
        Bk, Hk, n, W = k.shape
        pt, dev = self.per_tile, k.device
        n_vb = n * pt
        n_kb = n_vb + self.text_blocks
        vt = torch.arange(n_vb, n_vb + self.valid_text_blocks, device=dev, dtype=torch.int32)
        # Video query blocks: the blocks of their key tiles are full; valid text blocks partial.
        blocks = (k[..., None] * pt + torch.arange(pt, device=dev)).reshape(Bk, Hk, n, W * pt).clamp(max=n_kb - 1)
        full_idx = torch.zeros(Bk, Hk, n_kb, n_kb, dtype=torch.int32, device=dev)
        full_idx[:, :, :n_vb, :W * pt] = blocks.repeat_interleave(pt, 2)
        full_num = torch.zeros(Bk, Hk, n_kb, dtype=torch.int32, device=dev)
        full_num[:, :, :n_vb] = (c * pt).repeat_interleave(pt, 2)
        part_idx = torch.zeros(Bk, Hk, n_kb, n_kb, dtype=torch.int32, device=dev)
        part_num = torch.zeros(Bk, Hk, n_kb, dtype=torch.int32, device=dev)
        part_idx[:, :, :n_vb, :len(vt)] = vt
        part_num[:, :, :n_vb] = len(vt)
        # Text query blocks with a valid row: every video block and the valid text blocks,
        # partial (their padding rows attend nothing).
        text_rows = slice(n_vb, n_vb + self.valid_text_blocks)
        part_idx[:, :, text_rows, :n_vb] = torch.arange(n_vb, device=dev, dtype=torch.int32)
        part_idx[:, :, text_rows, n_vb:n_vb + len(vt)] = vt
        part_num[:, :, text_rows] = n_vb + len(vt)
        return self._from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=self.BLOCK,
                                    mask_mod=self._mask_mod, seq_lengths=(self.seq, self.seq), **self._forward_only)

    def __call__(self, q, k, v, keys, attended):
        return self.flex(q, k, v, block_mask=self.block_mask(keys, attended), enable_gqa=q.shape[1] != k.shape[1])
