"""Window plus selected tiles: the sparse attention of HunyuanVideo-1.5 (SSTA) and
Kandinsky (NABLA) on sta_dist's kernels. ``config`` (what a caller asks for), ``rules``
(window rules as index math), ``means`` / ``choose`` (the selection on the device),
``tables`` (per-query-tile key-tile lists), ``attention`` (one device)."""

from .config import WINDOW_RULES, Mass, TopK

__all__ = ["TopK", "Mass", "WINDOW_RULES"]
