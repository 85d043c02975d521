"""The kernels side by side on the local calls the runtime makes (HunyuanVideo
30x48x80, tile 6x8x8, 24 heads, head dim 128): one process, interleaved timing, one line
per case ``case kernel ms vs_first max_diff``, then the JSON of the table in ``--out``.

Cases: the whole canvas in natural order (one GPU), with the log-sum-exp, in fp16, with
256 text rows (200 keys valid; text queries through SDPA), the whole canvas in tiled order
(a head-mode rank's tokens), and a tile-mode rank's half of the canvas with its halo
(packed tiles, the log-sum-exp as the text merge asks); "table": the whole canvas with the
window given as key lists (the table path of selected tiles, with nothing selected).

    python3 tools/hopper_bench.py --kernels cuda,triton --out out/
    python3 tools/hopper_bench.py --kernels cuda --cases natural --once   # one call each (a profiler)
    python3 tools/hopper_bench.py --kernels cuda --sources .ab/old.cu     # the tree's CUDA kernel against
                                                                          # another source of it ("cuda@old")
    python3 tools/hopper_bench.py --kernels cuda --sources .ab/old/sta_fwd_cuda.cu   # a whole kernels/ copy
                                                                          # ("cuda@old")

A source given by ``--sources`` is the main ``.cu``: the headers it includes are taken from
beside it where they are there (a copy of another commit's ``kernels/``), else from the
tree's ``kernels/`` (a one-file change). Its library must have the tree's host interface
(``sta_fwd_cuda_args.h``); a source from before that interface is refused at load: compare
such a commit whole (``tools/gpu.sh``'s ``AB=DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

import torch

from sta_dist import geometry, to_tiled
from sta_dist.bench.common import time_ms
from sta_dist.dispatch import run_local
from sta_dist.local import LocalHeads, LocalLayout, LocalText

CANVAS, TILE, HEADS, D = (30, 48, 80), (6, 8, 8), 24, 128
WINDOWS = [(3, 3, 3)] * HEADS


def randn(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=dtype)


def case_args(name: str):
    """``(q, k, v, layout, heads, text, return_lse)`` of one case."""
    dtype = torch.float16 if name == "fp16" else torch.bfloat16
    text_len = 256 if name == "text" else 0
    n = math.prod(CANVAS)
    q, k, v = (randn((1, n + text_len, HEADS, D), dtype, i) for i in range(3))
    grid = geometry.grid_shape(CANVAS, TILE)
    heads = LocalHeads.build(WINDOWS, grid, HEADS)
    text = LocalText.single(200 if text_len else 0)
    if name == "tiled":
        return (*(to_tiled(x, CANVAS, TILE) for x in (q, k, v)), LocalLayout.tiled(CANVAS, TILE, 0), heads, text,
                False)
    if name == "box_halo":  # w tile index < 5 of 10: half the canvas, its halo one tile column
        ids = range(geometry.num_tiles(grid))
        box = [t for t in ids if geometry.tile_coords(t, grid)[2] < 5]
        halo = [t for t in ids if geometry.tile_coords(t, grid)[2] == 5]
        qr, kr = (geometry.packed_natural_index(CANVAS, TILE, t).cuda() for t in (box, box + halo))
        layout = LocalLayout.packed(CANVAS, TILE, 0, box, box + halo, text_q_video_keys=len(qr))
        return q[:, qr], k[:, kr], v[:, kr], layout, heads, text, True
    return q, k, v, LocalLayout.natural(CANVAS, TILE, text_len), heads, text, name == "lse"


def window_lists(layout: LocalLayout, device="cuda"):
    """The (3,3,3) window as key lists (what the "table" case hands the kernel)."""
    from sta_dist.selection.attention import build_key_tiles

    return build_key_tiles(None, WINDOWS[:1], "sta", layout, None, device)[0]


CASES = ("natural", "lse", "fp16", "text", "tiled", "box_halo", "table")


@contextlib.contextmanager
def cuda_source(lib):
    """The route's CUDA kernel calls go to ``lib`` (another source's build) inside."""
    from sta_dist.kernels import sta_fwd_cuda

    tree = sta_fwd_cuda.library
    sta_fwd_cuda.library = lambda: lib
    try:
        yield
    finally:
        sta_fwd_cuda.library = tree


def source_kernels(sources: str) -> dict:
    """``{"cuda@<name>": library}`` for each comma-separated ``.cu`` path (name: the file's
    stem, or its folder's name for a ``sta_fwd_cuda.cu``)."""
    from sta_dist.kernels import sta_fwd_cuda

    libs = {}
    for src in filter(None, sources.split(",")):
        path = Path(src)
        name = path.parent.resolve().name if path.stem == "sta_fwd_cuda" else path.stem
        try:
            libs[f"cuda@{name}"] = sta_fwd_cuda.load(sta_fwd_cuda.build(sta_fwd_cuda.nvcc(), path))
        except OSError as err:
            raise SystemExit(f"hopper_bench: --sources {src}: {err}") from None
    return libs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default="cuda,triton", help="comma-separated backends; the first is the baseline")
    parser.add_argument("--once", action="store_true", help="one call per kernel and case, no timing (for a profiler)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--sources", default="", help="comma-separated .cu files: the CUDA kernel built from each, "
                                                     "timed as backend cuda@<stem>")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    libs = source_kernels(args.sources)
    kernels = args.kernels.split(",") + list(libs)
    rows = []
    for name in args.cases.split(","):
        q, k, v, layout, heads, text, lse = case_args("natural" if name == "table" else name)
        keys = window_lists(layout) if name == "table" else None

        def call(kern):
            with cuda_source(libs[kern]) if kern in libs else contextlib.nullcontext():
                return run_local(q, k, v, layout, heads, text, D**-0.5, backend=kern.split("@")[0], return_lse=lse,
                                 keys=keys)

        fns = {kern: (lambda kern=kern: call(kern)) for kern in kernels}
        first = fns[kernels[0]]()
        first = first[0] if lse else first
        if args.once:
            for fn in list(fns.values())[1:]:
                fn()
            torch.cuda.synchronize()
            continue
        times = {kern: [] for kern in kernels}
        for _ in range(3):  # interleaved: each kernel timed three times, the median kept
            for kern, fn in fns.items():
                times[kern].append(time_ms(fn))
        for kern in kernels:
            out = fns[kern]()
            out = out[0] if lse else out
            ms = sorted(times[kern])[1]
            base = sorted(times[kernels[0]])[1]
            diff = (out.float() - first.float()).abs().max().item()
            rows.append(dict(case=name, kernel=kern, ms=round(ms, 3), vs_first=round(base / ms, 3),
                             max_diff=round(diff, 5)))
            print(f"{name:9s} {kern:7s} {ms:8.3f} ms  {base / ms:5.3f}x of {kernels[0]}  max diff {diff:.2e}",
                  flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hopper_bench.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows),
                                                               indent=1))


if __name__ == "__main__":
    main()
