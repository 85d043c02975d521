"""What sta_dist needs to know of each supported diffusers transformer: its attention
layers in strategy order, heads, patch size, text, token order, the sparse attention it
ships (its tile, window and selection), and the modules where the whole transformer is
sharded (RoPE, the first block) and gathered (the output projection)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..geometry import Triple
from ..validation import check_text_length

SUPPORTED = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "HunyuanVideo15Transformer3DModel",
             "Kandinsky6SRTransformer3DModel")


@dataclass(frozen=True, eq=False)
class ModelSpec:
    name: str
    attention: tuple[torch.nn.Module, ...]
    """The attention modules sta_dist serves, in mask-strategy layer order."""
    processor: Callable
    """``processor(handle, layer) -> an attention processor`` for one of ``attention``."""
    num_heads: int
    head_dim: int
    patch_size: Triple
    joint_text: bool
    """Text tokens are part of self-attention (after the video tokens)."""
    rope: torch.nn.Module
    rope_seq_dim: int
    """The token dim of the RoPE module's outputs."""
    first_block: torch.nn.Module
    """Hidden states are sharded at its input (video tokens, right after the patch embedding)."""
    proj_out: torch.nn.Module
    """The output is gathered at its output (a few channels per token, not the model width)."""
    text: Optional[Callable] = None
    """``text(forward arguments, batch) -> (text_len, text_length)`` for joint text; a
    ``text_length`` of ``None`` is read from the first layer's text mask instead."""
    layout: str = "natural"
    """The token order of the attention's sequence: ``"tiled"`` for a model that orders its
    tokens in tiles of ``tile`` (Kandinsky's 8x8 neighbourhoods)."""
    channels_last: bool = False
    """Latents are ``[B, F, H, W, C]`` (else ``[B, C, F, H, W]``)."""
    tile: Optional[Triple] = None
    """The tile the model's token order fixes (``layout="tiled"``), else ``None`` (any)."""
    defaults: dict = field(default_factory=dict)
    """The sparse attention the model ships: ``window``, ``select``, ``window_rule``."""
    shardable: bool = True
    """Whether ``parallel=`` can shard the whole transformer (natural token order)."""

    def canvas(self, latents: torch.Tensor) -> Triple:
        """Tokens per axis after patching of the latents, as the model floors them."""
        layout = "[B, F, H, W, C]" if self.channels_last else "[B, C, F, H, W]"
        if latents.dim() != 5:
            raise ValueError(f"hidden_states must be latents {layout}, got shape {tuple(latents.shape)}")
        sizes = latents.shape[1:4] if self.channels_last else latents.shape[2:]
        return tuple(n // p for n, p in zip(sizes, self.patch_size))  # type: ignore[return-value]


def _hunyuan_text(bound: dict, batch: int):
    """HunyuanVideo attends the first ``encoder_attention_mask.sum()`` text tokens of each
    sample: read once per forward."""
    text_len = bound["encoder_hidden_states"].shape[1]
    mask = bound.get("encoder_attention_mask")
    return text_len, check_text_length(None if mask is None else mask.sum(1), text_len, batch)


def _hunyuan15_text(bound: dict, batch: int):
    """HunyuanVideo-1.5 joins image, ByT5 and MLLM tokens into one text of their three
    lengths, valid ones first; its blocks get that mask, so the valid counts are read from
    the first layer's ``attention_mask`` (once per forward)."""
    lengths = [bound["encoder_hidden_states"].shape[1]]
    for name in ("encoder_hidden_states_2", "image_embeds"):
        x = bound.get(name)
        if x is None:
            raise ValueError(f"HunyuanVideo15Transformer3DModel needs {name}, got None")
        lengths.append(x.shape[1])
    return sum(lengths), None


def model_spec(transformer: torch.nn.Module) -> ModelSpec:
    """The spec of a supported transformer; any other class is refused by name."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    if isinstance(transformer, WanTransformer3DModel):
        from .wan import WanSTAProcessor

        cfg = transformer.config
        blocks = transformer.blocks
        return ModelSpec("WanTransformer3DModel", tuple(b.attn1 for b in blocks), WanSTAProcessor,
                         cfg.num_attention_heads, cfg.attention_head_dim, tuple(cfg.patch_size), False,
                         transformer.rope, 1, blocks[0], transformer.proj_out)
    if isinstance(transformer, HunyuanVideoTransformer3DModel):
        from .hunyuan import HunyuanVideoSTAProcessor

        cfg = transformer.config
        double, single = transformer.transformer_blocks, transformer.single_transformer_blocks
        first: Optional[torch.nn.Module] = double[0] if len(double) else (single[0] if len(single) else None)
        if first is None:
            raise ValueError("HunyuanVideoTransformer3DModel must have at least one transformer block, got 0")
        return ModelSpec("HunyuanVideoTransformer3DModel", tuple(b.attn for b in (*double, *single)),
                         HunyuanVideoSTAProcessor, cfg.num_attention_heads, cfg.attention_head_dim,
                         (cfg.patch_size_t, cfg.patch_size, cfg.patch_size), True, transformer.rope, 0, first,
                         transformer.proj_out, text=_hunyuan_text)
    spec = _selection_model_spec(transformer)
    if spec is not None:
        return spec
    raise TypeError(f"sta_dist.diffusers supports {', '.join(SUPPORTED)}, got {type(transformer).__name__}")


def _selection_model_spec(transformer: torch.nn.Module) -> Optional[ModelSpec]:
    """HunyuanVideo-1.5 (its SSTA: window plus TopK, which diffusers runs dense) and
    Kandinsky 6 SR (its NABLA: a clipped window plus Mass, which diffusers runs through
    FlexAttention), when this diffusers has them."""
    import diffusers

    hv15 = getattr(diffusers, "HunyuanVideo15Transformer3DModel", None)
    if hv15 is not None and isinstance(transformer, hv15):
        from .hunyuan15 import HunyuanVideo15STAProcessor

        cfg = transformer.config
        blocks = transformer.transformer_blocks
        if not len(blocks):
            raise ValueError("HunyuanVideo15Transformer3DModel must have at least one transformer block, got 0")
        return ModelSpec("HunyuanVideo15Transformer3DModel", tuple(b.attn for b in blocks), HunyuanVideo15STAProcessor,
                         cfg.num_attention_heads, cfg.attention_head_dim,
                         (cfg.patch_size_t, cfg.patch_size, cfg.patch_size), True, transformer.rope, 0, blocks[0],
                         transformer.proj_out, text=_hunyuan15_text)
    sr = getattr(diffusers, "Kandinsky6SRTransformer3DModel", None)
    if sr is not None and isinstance(transformer, sr):
        from ..selection import Mass
        from .kandinsky import FRACTAL, Kandinsky6SRSTAProcessor

        cfg = transformer.config
        blocks = transformer.visual_transformer_blocks
        if not len(blocks):
            raise ValueError("Kandinsky6SRTransformer3DModel must have at least one transformer block, got 0")
        attention = tuple(b.self_attention for b in blocks)
        return ModelSpec("Kandinsky6SRTransformer3DModel", attention, Kandinsky6SRSTAProcessor,
                         attention[0].num_heads, sum(cfg.axes_dims), tuple(cfg.patch_size), False,
                         transformer.visual_rope_embeddings, 0, blocks[0], transformer.out_layer, layout="tiled",
                         channels_last=True, tile=FRACTAL, shardable=False,
                         defaults=dict(window=tuple(cfg.nabla_window), select=Mass(float(cfg.nabla_threshold)),
                                       window_rule="clipped"))
    return None
