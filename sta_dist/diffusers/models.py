"""What sta_dist needs to know of each supported diffusers transformer: its attention
layers in strategy order, heads, patch size, text, and the modules where the whole
transformer is sharded (RoPE, the first block) and gathered (the output projection)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..geometry import Triple

SUPPORTED = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel")


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

    def canvas(self, latents: torch.Tensor) -> Triple:
        """Tokens per axis after patching of ``latents [B, C, F, H, W]``, as the model floors them."""
        if latents.dim() != 5:
            raise ValueError(f"hidden_states must be latents [B, C, F, H, W], got shape {tuple(latents.shape)}")
        return tuple(n // p for n, p in zip(latents.shape[2:], self.patch_size))  # type: ignore[return-value]


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
                         transformer.proj_out)
    raise TypeError(f"sta_dist.diffusers supports {', '.join(SUPPORTED)}, got {type(transformer).__name__}")
