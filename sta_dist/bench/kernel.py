"""``sta-dist bench kernel``: our kernel beside FlexAttention-STA and SDPA dense, each
case checked against the reference in the same run; a table, JSON and a PNG.

Effective TFLOP/s counts only attended score entries: ``4 * B * H * pairs * D``.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from .. import geometry
from ..api import sliding_tile_attention
from ..geometry import Triple
from ..mask_strategy import MaskStrategy
from ..testing import sampled_check
from . import anchors
from .common import FULL, HUNYUAN, TILE, WAN_480, time_ms


@dataclass(frozen=True)
class BenchCase:
    name: str
    canvas: Triple
    windows: tuple[Triple, ...]
    """One window per head."""
    tile: Triple = TILE
    text_len: int = 0
    text_valid: int = 0
    head_dim: int = 128
    anchors: tuple[str, ...] = ("flex",)

    @property
    def heads(self) -> int:
        return len(self.windows)

    @property
    def seq(self) -> int:
        return geometry.volume(self.canvas) + self.text_len


def uniform(name, canvas, window, heads=24, **kw) -> BenchCase:
    return BenchCase(name, canvas, (window,) * heads, **kw)


STANDARD_CASES = {
    c.name: c
    for c in [
        uniform("hunyuan_333", HUNYUAN, (3, 3, 3)),
        uniform("hunyuan_full", HUNYUAN, FULL, anchors=("flex", "cudnn", "flash")),
        uniform("hunyuan_333_text", HUNYUAN, (3, 3, 3), text_len=256, text_valid=200),
        BenchCase("hunyuan_mixed", HUNYUAN, ((3, 3, 3),) * 12 + (FULL,) * 12),
        uniform("wan_335", WAN_480, (3, 3, 5)),
        uniform("wan_3110", WAN_480, (3, 1, 10)),
        uniform("wan_full", WAN_480, (3, 6, 10), anchors=("flex", "cudnn")),
    ]
}


def replay_sets(strategy: MaskStrategy) -> list[tuple[tuple[Triple, ...], int]]:
    """Distinct per-layer window sets of a mask strategy with their counts. A set is a
    multiset over heads (sorted): head order changes no kernel's work."""
    counts: collections.Counter = collections.Counter()
    for windows, n in strategy.layer_window_counts().items():
        counts[tuple(sorted(windows))] += n
    return sorted(counts.items(), key=lambda x: -x[1])


def attended_pairs(case: BenchCase) -> int:
    """Attended (query, key) pairs summed over heads, for one batch element."""
    grid = geometry.grid_shape(case.canvas, case.tile)
    n_video = geometry.volume(case.canvas)
    tile_tokens = [
        geometry.volume(geometry.tile_extent(geometry.tile_coords(t, grid), case.canvas, case.tile))
        for t in range(geometry.num_tiles(grid))
    ]
    total = 0
    for window in case.windows:
        for t, n_q in enumerate(tile_tokens):
            keys = geometry.window_tiles(geometry.tile_coords(t, grid), window, grid)
            total += n_q * (sum(tile_tokens[k] for k in keys) + case.text_valid)
        total += case.text_valid * (n_video + case.text_valid)
    return total


@dataclass
class CaseResult:
    name: str
    pairs: int
    ours_ms: float
    check: dict
    anchors_ms: dict = field(default_factory=dict)

    def tflops(self, ms: float, head_dim: int) -> float:
        return 4 * self.pairs * head_dim / (ms * 1e-3) / 1e12


def run_case(case: BenchCase, dtype=torch.bfloat16, seed: int = 0, with_anchors: bool = True) -> CaseResult:
    device = "cuda"
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, case.seq, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    kw = dict(canvas=case.canvas, tile=case.tile, window=list(case.windows), text_length=case.text_valid)

    def ours():
        return sliding_tile_attention(q, k, v, **kw)

    out = ours()
    check = sampled_check(q, k, v, out, **kw, seed=seed)
    result = CaseResult(case.name, attended_pairs(case), time_ms(ours), check)
    del out
    if with_anchors:
        perm = geometry.tiled_permutation(case.canvas, case.tile).to(device)
        n_video = geometry.volume(case.canvas)
        for name in case.anchors:
            if name == "flex":
                fn = flex_anchor(case.canvas, case.tile, case.text_len, case.text_valid,
                                 case.heads).set_windows(case.windows)
                order = torch.cat([perm, torch.arange(n_video, case.seq, device=device)])
                qt, kt, vt = (x[:, order].transpose(1, 2).contiguous() for x in (q, k, v))
            else:
                fn = anchors.sdpa(name)
                qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            result.anchors_ms[name] = time_ms(lambda: fn(qt, kt, vt))
            del qt, kt, vt
            torch.cuda.empty_cache()
    return result


_SWEEP_BASE = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
SWEEP_CONFIGS = [dict(_SWEEP_BASE, **extra) for extra in (
    {}, dict(TMA=False), dict(num_stages=2), dict(BLOCK_N=64, num_stages=4),
    dict(BLOCK_M=64, num_warps=4), dict(num_warps=4),
)]
"""Launch configs that ``sta-dist bench kernel --sweep`` times (``--config N`` picks one)."""


def sweep(case: BenchCase, configs: Sequence[dict], dtype=torch.bfloat16) -> list[tuple[dict, float, dict]]:
    """Time the kernel under each launch config; each output checked on sampled rows."""
    from ..config import STAConfig
    from ..local import LocalHeads, LocalLayout, LocalText
    from ..dispatch import run_local

    g = torch.Generator(device="cuda").manual_seed(1)
    shape = (1, case.seq, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=dtype) for _ in range(3))
    cfg = STAConfig(canvas=case.canvas, tile=case.tile, text_len=case.text_len)
    layout = LocalLayout.natural(cfg.canvas, cfg.tile, cfg.text_len)
    heads = LocalHeads.build(case.windows, cfg.grid, case.heads)
    text = LocalText.single(case.text_valid)
    kw = dict(canvas=case.canvas, tile=case.tile, window=list(case.windows), text_length=case.text_valid)
    rows = []
    for config in configs:
        try:
            fn = functools.partial(run_local, q, k, v, layout, heads, text, case.head_dim**-0.5, backend="triton",
                                   config=config)
            check = sampled_check(q, k, v, fn(), **kw)
            rows.append((config, time_ms(fn), check))
        except Exception as err:  # a config the compiler cannot fit is reported, not fatal
            rows.append((config, float("nan"), dict(ok=False, error=repr(err)[:120])))
        print(f"sweep {case.name} {rows[-1][0]} {rows[-1][1]:.2f} ms ok={rows[-1][2].get('ok')} "
              f"err={rows[-1][2].get('error')}", flush=True)
    return rows


@functools.lru_cache(maxsize=8)
def flex_anchor(canvas, tile, text_len, text_valid, heads) -> anchors.FlexSTA:
    """One FlexAttention anchor per problem shape, so window changes do not recompile."""
    return anchors.FlexSTA(canvas, tile, text_len, text_valid, heads, "cuda")


def format_table(results: Sequence[CaseResult], head_dim: int) -> str:
    names = sorted({a for r in results for a in r.anchors_ms})
    head = ["case", "ours ms", "TFLOP/s", *[f"{a} ms" for a in names], *[f"{a}/ours" for a in names], "err", "bound", "ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.name, f"{r.ours_ms:.2f}", f"{r.tflops(r.ours_ms, head_dim):.0f}"]
        row += [f"{r.anchors_ms[a]:.2f}" if a in r.anchors_ms else "" for a in names]
        row += [f"{r.anchors_ms[a] / r.ours_ms:.2f}x" if a in r.anchors_ms else "" for a in names]
        row += [f"{r.check['error']:.2e}", f"{r.check['bound']:.2e}", "yes" if r.check["ok"] else "NO"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: Sequence[CaseResult], path: str, head_dim: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [r.name for r in results]
    series = {"ours": [r.tflops(r.ours_ms, head_dim) for r in results]}
    for a in sorted({a for r in results for a in r.anchors_ms}):
        series[a] = [r.tflops(r.anchors_ms[a], head_dim) if a in r.anchors_ms else 0 for r in results]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.2), 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("effective TFLOP/s")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def environment() -> dict:
    import triton

    return dict(
        date=time.strftime("%Y-%m-%d"),
        card=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
    )


def run_replay(strategy: MaskStrategy, out_dir: str, canvas: Triple = HUNYUAN, heads: int = 24,
               head_dim: int = 128, validate: int = 30, dtype=torch.bfloat16) -> dict:
    """Replay a mask strategy over all its layers.

    Heads are independent programs of both kernels, so a layer's time is the sum of its
    heads' times: each distinct window is timed once on all heads (ours, and
    FlexAttention-STA with the windows in a per-head mask), giving a per-head cost, and
    every layer is the sum over its heads. The model is checked by timing the ``validate``
    most frequent per-layer window sets directly (each also checked on sampled rows).
    Dense cuDNN is timed once for every layer. Rows are written as they come."""
    g = torch.Generator(device="cuda").manual_seed(2)
    S = geometry.volume(canvas)
    q, k, v = (torch.randn(1, S, heads, head_dim, generator=g, device="cuda", dtype=dtype) for _ in range(3))
    perm = geometry.tiled_permutation(canvas, TILE).to("cuda")
    qt, kt, vt = (x[:, perm].transpose(1, 2).contiguous() for x in (q, k, v))
    flex = flex_anchor(canvas, TILE, 0, 0, heads)
    sets = replay_sets(strategy)
    result: dict = dict(per_head={}, validated=[])
    path = os.path.join(out_dir, "replay.json")

    def measure(windows, seed):
        kw = dict(canvas=canvas, tile=TILE, window=list(windows), text_length=0)
        out = sliding_tile_attention(q, k, v, **kw)
        check = sampled_check(q, k, v, out, **kw, n_rows=32, seed=seed)
        del out
        ours = time_ms(lambda: sliding_tile_attention(q, k, v, **kw), 3, 30.0)
        flex.set_windows(windows, per_head_mask=True)
        return ours, time_ms(lambda: flex(qt, kt, vt), 3, 30.0), check

    for i, window in enumerate(sorted({w for windows, _ in sets for w in windows})):
        ours, flex_ms, check = measure((window,) * heads, i)
        result["per_head"][str(window)] = dict(ours_ms=ours / heads, flex_ms=flex_ms / heads, ok=check["ok"])
        print(f"window {window}: ours {ours:.2f} ms flex {flex_ms:.2f} ms (24 heads) ok={check['ok']}", flush=True)

    def model(windows, key):
        return sum(result["per_head"][str(w)][key] for w in windows)

    for i, (windows, count) in enumerate(sets[:validate]):
        ours, flex_ms, check = measure(windows, 100 + i)
        result["validated"].append(dict(windows=[list(w) for w in windows], count=count, ours_ms=ours, flex_ms=flex_ms,
                                        ours_model_ms=model(windows, "ours_ms"), flex_model_ms=model(windows, "flex_ms"),
                                        ok=check["ok"], error_over_bound=check["error"] / check["bound"]))
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    dense = anchors.sdpa("cudnn")
    qd, kd, vd = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    cudnn_ms = time_ms(lambda: dense(qd, kd, vd))
    layers = sum(c for _, c in sets)
    val = result["validated"]
    totals = dict(ours_model=sum(c * model(w, "ours_ms") for w, c in sets),
                  flex_model=sum(c * model(w, "flex_ms") for w, c in sets), cudnn_dense=layers * cudnn_ms,
                  ours_validated=sum(r["count"] * r["ours_ms"] for r in val),
                  flex_validated=sum(r["count"] * r["flex_ms"] for r in val))
    result["summary"] = dict(
        sets=len(sets), layers=layers, validated_sets=len(val), validated_layers=sum(r["count"] for r in val),
        cudnn_dense_ms_per_layer=cudnn_ms, totals_ms=totals,
        ours_over_flex=totals["ours_model"] / totals["flex_model"],
        ours_over_cudnn=totals["ours_model"] / totals["cudnn_dense"],
        validated_ours_over_flex=totals["ours_validated"] / totals["flex_validated"],
        model_error_ours=max(abs(r["ours_ms"] / r["ours_model_ms"] - 1) for r in val),
        model_error_flex=max(abs(r["flex_ms"] / r["flex_model_ms"] - 1) for r in val),
        all_checked_ok=all(r["ok"] for r in val) and all(r["ok"] for r in result["per_head"].values()))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("replay:", json.dumps(result["summary"]), flush=True)
    return result


def run_kernel_bench(case_names: Sequence[str], out_dir: str, replay: Optional[str] = None,
                     with_anchors: bool = True) -> list[CaseResult]:
    """Run the named cases (and a mask-strategy replay), print a table, write JSON + PNG.
    Cases of :data:`sta_dist.bench_selection.SELECTION_CASES` (window plus selected tiles)
    get their own table and JSON key."""
    from .selection import SELECTION_CASES, run_selection_case
    from .selection import format_table as selection_table

    if not torch.cuda.is_available():
        raise RuntimeError("sta-dist bench kernel needs a CUDA device")
    selection = [run_selection_case(SELECTION_CASES[name]) for name in case_names if name in SELECTION_CASES]
    case_names = [name for name in case_names if name not in SELECTION_CASES]
    results = []
    for name in case_names:
        results.append(run_case(STANDARD_CASES[name], with_anchors=with_anchors))
        r = results[-1]
        print(f"{r.name}: ours {r.ours_ms:.2f} ms, anchors {r.anchors_ms}, check {r.check}", flush=True)
    hd = 128
    os.makedirs(out_dir, exist_ok=True)
    payload: dict = dict(env=environment(), results=[asdict(r) for r in results])
    if selection:
        print(selection_table(selection))
        payload["selection"] = selection
    if results:
        print(format_table(results, hd))
        plot(results, os.path.join(out_dir, "kernel_bench.png"), hd)
    if replay:
        payload["replay"] = run_replay(MaskStrategy.load(replay), out_dir)
    with open(os.path.join(out_dir, "kernel_bench.json"), "w") as f:
        json.dump(payload, f, indent=1)
    return results
