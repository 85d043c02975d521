"""Which window each (step, layer, head) of a transformer uses: one window for all, one
per head, one per (layer, head), or a FastVideo-format mask strategy (per step)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ..config import check_triple
from ..geometry import Triple
from ..mask_strategy import MaskStrategy

LayerWindows = tuple[Triple, ...]


def _is_triple(value) -> bool:
    try:
        return len(value) == 3 and all(hasattr(v, "__index__") and not isinstance(v, bool) for v in value)
    except TypeError:
        return False


def _fixed_table(window, num_layers: int, num_heads: int) -> tuple[LayerWindows, ...]:
    """``window`` as one row of ``num_heads`` windows per layer."""
    shape = f"one (kt, kh, kw), one per head ({num_heads}) or one per (layer, head) ({num_layers} x {num_heads})"
    if _is_triple(window):
        return ((check_triple("window", window),) * num_heads,) * num_layers
    try:
        items = list(window)
    except TypeError:
        raise TypeError(f"window must be {shape}, got window={window!r}") from None
    if items and all(_is_triple(w) for w in items):
        if len(items) != num_heads:
            raise ValueError(f"window must be {shape}: got {len(items)} triples for a model with {num_heads} heads")
        row = tuple(check_triple(f"window[{h}]", w) for h, w in enumerate(items))
        return (row,) * num_layers
    if items and all(not _is_triple(row) and hasattr(row, "__len__") for row in items):
        if len(items) != num_layers or any(len(row) != num_heads for row in items):
            got = f"{len(items)} layers with {sorted({len(row) for row in items})} heads"
            raise ValueError(f"window must be {shape}: got {got}")
        return tuple(tuple(check_triple(f"window[{l}][{h}]", w) for h, w in enumerate(row))
                     for l, row in enumerate(items))
    raise ValueError(f"window must be {shape}, got window={window!r}")


def _load_strategy(mask_strategy) -> MaskStrategy:
    if isinstance(mask_strategy, MaskStrategy):
        return mask_strategy
    if isinstance(mask_strategy, (str, os.PathLike)):
        return MaskStrategy.load(mask_strategy)
    if isinstance(mask_strategy, Mapping):
        return MaskStrategy.from_dict(mask_strategy)
    raise TypeError("mask_strategy must be a path to a FastVideo-format JSON (optionally .gz), a dict of "
                    f"'step_layer_head' -> [kt, kh, kw], or a sta_dist.MaskStrategy, got {type(mask_strategy).__name__}")


@dataclass(frozen=True)
class WindowTable:
    """Windows indexed ``[step][layer][head]``; a fixed window has one step that every
    step uses."""

    steps: tuple[tuple[LayerWindows, ...], ...]
    per_step: bool
    """Whether the table has one entry per denoising step (a mask strategy)."""

    @staticmethod
    def build(window, mask_strategy, num_layers: int, num_heads: int) -> "WindowTable":
        """From ``enable``'s ``window`` or ``mask_strategy`` (exactly one of them)."""
        if (window is None) == (mask_strategy is None):
            raise ValueError("give exactly one of window=(kt, kh, kw) (or one per head / per (layer, head)) and "
                             f"mask_strategy=path, got window={window!r}, mask_strategy={mask_strategy!r}")
        if window is not None:
            return WindowTable((_fixed_table(window, num_layers, num_heads),), per_step=False)
        strategy = _load_strategy(mask_strategy)
        if (strategy.num_layers, strategy.num_heads) != (num_layers, num_heads):
            raise ValueError(
                f"mask_strategy must give a window for every attention layer and head of the model: the model has "
                f"{num_layers} layers x {num_heads} heads, the strategy has {strategy.num_layers} layers x "
                f"{strategy.num_heads} heads")
        return WindowTable(strategy.windows, per_step=True)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def check_step(self, step: int) -> int:
        if isinstance(step, bool) or not hasattr(step, "__index__") or step < 0:
            raise ValueError(f"step must be an int >= 0, got step={step!r}")
        if self.per_step and step >= self.num_steps:
            raise ValueError(f"step must be in [0, {self.num_steps}) for this mask strategy, got step={step}")
        return int(step)

    def layer(self, step: int, layer: int) -> LayerWindows:
        """One window per head of ``layer`` at ``step``."""
        return self.steps[step if self.per_step else 0][layer]

    def distinct(self, step: int) -> tuple[Triple, ...]:
        """Every distinct window of ``step`` (the shard plan's hint)."""
        return tuple(sorted({w for row in self.steps[step if self.per_step else 0] for w in row}))
