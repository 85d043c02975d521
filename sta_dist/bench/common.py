"""What the benchmarks share: the canvases and STA tile of the named cases, and the timer."""

from __future__ import annotations

import time
from typing import Callable

import torch

HUNYUAN = (30, 48, 80)
WAN_480 = (18, 48, 80)
TILE = (6, 8, 8)
FULL = (5, 6, 10)


def time_ms(fn: Callable, min_reps: int = 5, min_rep_ms: float = 100.0) -> float:
    """Median milliseconds of ``fn`` (device events, after a warm-up call)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate = (time.perf_counter() - start) * 1e3
    rep = min(max(min_rep_ms, estimate * min_reps), 4000.0)
    return triton.testing.do_bench(fn, warmup=max(min(25.0, min_rep_ms), estimate), rep=rep, return_mode="median")
