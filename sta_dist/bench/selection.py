"""``sta-dist bench kernel --cases hunyuan_topk8,hunyuan_mass09``: window plus selected
tiles, timed with the selection included, beside the window alone (as routed: the CUDA
kernel on Hopper; the Triton kernel's window path; and the window given as key lists, the
table path with nothing selected) and FlexAttention given the same block mask built per
call (its mask build timed too, as a caller pays it).
Every output is checked against the reference on sampled rows, the selection tile for tile.

The same code runs on a CPU at tiny shapes (the Triton interpreter, FlexAttention eager),
so the GPU run meets no bug the tests could have found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import geometry
from ..api import sliding_tile_attention, to_natural
from ..dispatch import run_local
from ..geometry import Triple
from ..local import LocalHeads, LocalText, call_layout
from ..selection import Mass, TopK
from ..selection.attention import local_key_tiles, table_heads
from ..testing import reference_selection, sampled_check
from .anchors import FlexTileLists
from .common import HUNYUAN, TILE, time_ms


@dataclass(frozen=True)
class SelectionCase:
    name: str
    canvas: Triple
    window: Triple
    select: object
    """``TopK`` or ``Mass``."""
    tile: Triple = TILE
    text_len: int = 0
    text_valid: int = 0
    heads: int = 24
    head_dim: int = 128
    window_rule: str = "sta"

    @property
    def seq(self) -> int:
        return geometry.volume(self.canvas) + self.text_len


SELECTION_CASES = {
    c.name: c
    for c in [
        SelectionCase("hunyuan_topk8", HUNYUAN, (3, 3, 3), TopK(8), text_len=256, text_valid=200),
        SelectionCase("hunyuan_mass09", HUNYUAN, (3, 3, 3), Mass(0.9), text_len=256, text_valid=200),
    ]
}


def case_inputs(case: SelectionCase, device, dtype, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, case.seq, case.heads, case.head_dim)
    return tuple(torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))


def case_functions(case: SelectionCase, q, k, v, compile_flex: bool = True) -> dict[str, Callable]:
    """What is timed, by row name: each a call with no arguments."""
    kw = dict(canvas=case.canvas, tile=case.tile, window=case.window, text_length=case.text_valid)
    layout = call_layout(case.canvas, case.tile, case.text_len, "natural")
    grid = geometry.grid_shape(case.canvas, case.tile)
    n = geometry.num_tiles(grid)
    windows = [case.window] * case.heads
    heads = table_heads(windows, case.window_rule, case.heads, grid, k.shape[2])
    use_triton = True
    nothing = torch.zeros(1, 1, n, n, dtype=torch.bool, device=q.device)
    window_heads = LocalHeads.build(windows, grid, k.shape[2])
    text = LocalText.single(case.text_valid)

    def selection():
        return local_key_tiles(q, k, layout, heads, windows, case.window_rule, case.select, use_triton)

    fns = {
        "ours (selection included)": lambda: sliding_tile_attention(q, k, v, **kw, select=case.select,
                                                                    window_rule=case.window_rule),
        "selection alone": selection,
        "window alone (as routed)": lambda: sliding_tile_attention(q, k, v, **kw),
        "window alone (Triton, window path)": lambda: run_local(q, k, v, layout, window_heads, text,
                                                                case.head_dim**-0.5, backend="triton"),
        "window alone (as key lists, as routed)": lambda: sliding_tile_attention(q, k, v, **kw, select=nothing),
    }
    flex = _flex_anchor(case, compile_flex)
    if flex is not None:
        order = torch.cat([geometry.tiled_permutation(case.canvas, case.tile).to(q.device),
                           torch.arange(geometry.volume(case.canvas), case.seq, device=q.device)])
        qt, kt, vt = (x[:, order].transpose(1, 2).contiguous() for x in (q, k, v))
        keys, attended = selection()
        fns["FlexAttention (selection + mask build + attention)"] = lambda: flex(qt, kt, vt, *selection())
        fns["FlexAttention mask build alone"] = lambda: flex.block_mask(keys, attended)
    return fns


def _flex_anchor(case: SelectionCase, compile_flex: bool) -> Optional[FlexTileLists]:
    try:
        return FlexTileLists(case.canvas, case.tile, case.text_len, case.text_valid, compile=compile_flex)
    except ValueError:  # tiles not of whole 128-token blocks: no exact block mask
        return None


def check_outputs(case: SelectionCase, q, k, v, fns: dict, n_rows: int = 384) -> dict:
    """Each output row checked against the reference on sampled rows."""
    kw = dict(canvas=case.canvas, tile=case.tile, window=case.window, text_length=case.text_valid, n_rows=n_rows)
    # The reference's selection once (the mask every checked row is compared under).
    sel = dict(select=reference_selection(q, k, case.canvas, case.tile, case.select), window_rule=case.window_rule)
    out, tiles = sliding_tile_attention(q, k, v, **{x: kw[x] for x in ("canvas", "tile", "window", "text_length")},
                                        select=case.select, window_rule=case.window_rule, return_selection=True)
    checks = {"ours (selection included)": sampled_check(q, k, v, out, **kw, **sel, selection=tiles)}
    del out
    for name in ("window alone (as routed)", "window alone (Triton, window path)",
                 "window alone (as key lists, as routed)"):
        checks[name] = sampled_check(q, k, v, fns[name](), **kw)
    flex_name = "FlexAttention (selection + mask build + attention)"
    if flex_name in fns:
        o = to_natural(fns[flex_name]().transpose(1, 2), case.canvas, case.tile)
        checks[flex_name] = sampled_check(q, k, v, o, **kw, **sel)
    checks["attended_tiles_per_query_tile"] = tiles.float().sum(-1).mean().item()
    return checks


def run_selection_case(case: SelectionCase, dtype=torch.bfloat16) -> dict:
    """Check, then time every row on the GPU (median ms)."""
    q, k, v = case_inputs(case, "cuda", dtype)
    fns = case_functions(case, q, k, v)
    checks = check_outputs(case, q, k, v, fns)
    rows = {name: dict(ms=time_ms(fn), check=checks.get(name)) for name, fn in fns.items()}
    torch.cuda.empty_cache()
    return dict(name=case.name, select=repr(case.select), window=case.window, window_rule=case.window_rule,
                attended_tiles_per_query_tile=checks["attended_tiles_per_query_tile"], rows=rows)


def format_table(results) -> str:
    lines = ["| case | row | ms | vs window alone (as routed) | ours faster by | checked |", "|---|---|---|---|---|---|"]
    for r in results:
        rows = r["rows"]
        window = rows["window alone (as routed)"]["ms"]
        ours = rows["ours (selection included)"]["ms"]
        for name, row in rows.items():
            check = row.get("check") or {}
            ok = "" if not check else ("yes" if check.get("ok") else "NO") + f" ({check['error']:.1e} <= {check['bound']:.1e})"
            faster = f"{row['ms'] / ours:.2f}x" if name.startswith("FlexAttention (") else ""
            lines.append(f"| {r['name']} | {name} | {row['ms']:.2f} | {row['ms'] / window:.2f}x | {faster} | {ok} |")
        lines.append(f"| {r['name']} | key tiles per query tile (window + selection) | "
                     f"{r['attended_tiles_per_query_tile']:.1f} | | | |")
    return "\n".join(lines)
