"""Frozen, validated configuration: the static shape of an STA problem and its windows.

Every user-facing check lives here or in :mod:`sta_dist.validation`, so an error always
names the argument, the rule and the value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence, Union

from . import geometry
from .geometry import Triple

WindowArg = Union[Sequence[int], Sequence[Sequence[int]]]


def check_triple(name: str, value, *, minimum: int = 1) -> Triple:
    """``value`` as a triple of ints, each ``>= minimum``, or a ValueError naming it."""
    try:
        triple = tuple(int(v) for v in value)
        exact = all(int(v) == v for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of 3 ints, got {name}={value!r}") from None
    if len(triple) != 3 or not exact:
        raise ValueError(f"{name} must be 3 ints (t, h, w), got {name}={value!r}")
    if any(v < minimum for v in triple):
        raise ValueError(f"{name} entries must all be >= {minimum}, got {name}={value!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True, slots=True)
class STAConfig:
    """The static shape of one sliding-tile-attention problem."""

    canvas: Triple
    """Video latent size ``(T, H, W)`` in tokens; natural order is row-major ``(t, h, w)``."""
    tile: Triple
    """Tile size ``(tt, th, tw)`` in tokens; need not divide the canvas."""
    text_len: int = 0
    """Number ``L`` of trailing text tokens in the sequence (valid or padding)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "canvas", check_triple("canvas", self.canvas))
        object.__setattr__(self, "tile", check_triple("tile", self.tile))
        if int(self.text_len) != self.text_len or self.text_len < 0:
            raise ValueError(f"text_len must be an int >= 0, got text_len={self.text_len!r}")
        object.__setattr__(self, "text_len", int(self.text_len))

    @property
    def grid(self) -> Triple:
        return geometry.grid_shape(self.canvas, self.tile)

    @property
    def num_tiles(self) -> int:
        return geometry.num_tiles(self.grid)

    @property
    def num_video(self) -> int:
        return geometry.volume(self.canvas)

    @property
    def seq_len(self) -> int:
        return self.num_video + self.text_len

    def windows(self, window: WindowArg, num_heads: int) -> tuple[Triple, ...]:
        """One validated window per head (see :func:`normalize_windows`)."""
        return normalize_windows(window, num_heads)


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float)) or hasattr(v, "__index__") or (hasattr(v, "dim") and v.dim() == 0)


def normalize_windows(window: WindowArg, num_heads: int) -> tuple[Triple, ...]:
    """``window`` as one ``(kt, kh, kw)`` per query head.

    Accepts a single triple (used for every head) or a sequence of ``num_heads`` triples.
    Tuples of ints are checked once (a model passes the same windows layer after layer,
    call after call); anything else every time.
    """
    if type(window) is tuple and all(type(v) is int or (type(v) is tuple and all(type(x) is int for x in v))
                                     for v in window):
        return _normalized(window, num_heads)
    return _normalize(window, num_heads)


@functools.lru_cache(maxsize=4096)
def _normalized(window: tuple, num_heads: int) -> tuple[Triple, ...]:
    return _normalize(window, num_heads)


def _normalize(window: WindowArg, num_heads: int) -> tuple[Triple, ...]:
    rule = "window must be (kt, kh, kw) in tiles or one such triple per query head"
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__"):
        raise TypeError(f"{rule}, got window={window!r}")
    items = window.tolist() if hasattr(window, "tolist") else list(window)
    if items and all(_is_scalar(v) for v in items):  # one triple: ints, maybe malformed
        return (check_triple("window", items),) * num_heads
    if len(items) != num_heads:
        raise ValueError(f"{rule}: expected {num_heads} windows, got len(window)={len(items)}")
    return tuple(check_triple(f"window[{h}]", w) for h, w in enumerate(items))
