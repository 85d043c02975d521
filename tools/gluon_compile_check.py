"""Compile the Gluon STA kernel (``sta_dist/kernels/sta_fwd_gluon.py``) for Hopper (sm_90) without a
GPU, at the HunyuanVideo shape (tile 6x8x8, head dim 128, bf16, 5-D boxes [1,2,8,8,128]),
for a few configs, and report per config: registers, spills, shared memory, the TMA box
metadata, and per loop of the SASS the tensor-core products (HGMMA), their waits
(WARPGROUP.DEPBAR), exponentials (MUFU.EX2), CTA/named barriers (BAR.SYNC), and whether
exponentials lie between an HGMMA issue and the wait that retires it (real overlap).

    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages:/work/main/.venv/lib/python3.11/site-packages \\
        /tmp/t36/bin/python tools/gluon_compile_check.py [--dump DIR]
"""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from sass import cubin_text, instructions, load_kernel_module, loops

MARKS = ("HGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "MUFU.EX2", "BAR.SYNC", "BAR.ARV", "SYNCS", "UTMALDG",
         "STL", "LDL")
CONFIGS = [
    dict(K_STAGES=2, V_STAGES=2),
    dict(K_STAGES=2, V_STAGES=3),
    dict(K_STAGES=3, V_STAGES=3),
    dict(K_STAGES=2, V_STAGES=2, PINGPONG=False),
    dict(K_STAGES=2, V_STAGES=2, STORE_LSE=True),
    dict(K_STAGES=2, V_STAGES=2, PACKED=True),
]


def compile_sm90(cfg: dict, tile=(6, 8, 8), dtype="bf16"):
    """Compile for sm_90; ``cfg`` holds launch constants and ``PACKED`` (tiles of consecutive rows placed by tables)."""
    mod = load_kernel_module("sta_fwd_gluon")
    kernel = mod._sta_fwd_gluon_kernel
    cfg = {**mod.DEFAULT_CONFIG, "STORE_LSE": False, "PACKED": False, **cfg}
    warps = cfg["num_warps"]
    const = dict(TT=tile[0], TH=tile[1], TW=tile[2], BN=mod.BLOCK, **{k: cfg[k] for k in (
        "PACKED", "K_STAGES", "V_STAGES", "STORE_LSE", "PINGPONG", "CONSUMER_REGS", "num_warps")})
    slices = mod.BLOCK // (tile[1] * tile[2])
    layout5, layout3 = (repr(mod.box_layout(torch.bfloat16, rank=r)) for r in (5, 3))  # bf16 and fp16 alike

    def box(n):  # n t-slices of a tile, natural order
        return f"tensordesc<{dtype}[1,{n},{tile[1]},{tile[2]},128],{layout5}>"

    def rows(n):  # n consecutive rows
        return f"tensordesc<{dtype}[1,{n},128],{layout3}>"

    # q and the output move in 64-row halves (one per consumer warpgroup), K and V in 128-row blocks.
    if cfg["PACKED"]:
        descs = dict(q_desc=rows(mod.BLOCK // 2), o_desc=rows(mod.BLOCK // 2), k_desc=rows(mod.BLOCK),
                     v_desc=rows(mod.BLOCK))
    else:
        descs = dict(q_desc=box(slices // 2), o_desc=box(slices // 2), k_desc=box(slices), v_desc=box(slices))
    descs.update(kt_desc=rows(mod.BLOCK), vt_desc=rows(mod.BLOCK))
    types = dict(HEADS="*i32", LSE="*fp32", Q_TILES="*i32", KV_TILES="*i32", qk_scale="fp32", **descs)
    sig = {name: "constexpr" if name in const else types.get(name, "i32")
           for name in inspect.signature(kernel.fn).parameters}
    src = GluonASTSource(kernel, sig, const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def overlap(body: list[str]) -> tuple[int, int]:
    """Run the loop body twice (so products issued at the end of one trip and retired at
    the top of the next count) and, in the second trip, count exponentials issued while
    at least one HGMMA group is in flight, out of all exponentials. A group is the HGMMAs
    up to the one marked ``gsb0``; ``WARPGROUP.DEPBAR.LE gsb0, N`` retires all but the
    newest N groups."""
    in_flight = 0
    open_group = False
    counted = total = 0
    for trip in range(2):
        for t in body:
            if "HGMMA" in t:
                open_group = True
                if "gsb0" in t:
                    in_flight += 1
                    open_group = False
            elif "WARPGROUP.DEPBAR" in t:
                m = re.search(r"LE\s+gsb0,\s*0x([0-9a-f]+)", t)
                in_flight = min(in_flight, int(m.group(1), 16) if m else 0)
            elif "MUFU.EX2" in t and trip == 1:
                total += 1
                counted += in_flight > 0 or open_group
    return counted, total


def report(cfg: dict, dump: Path | None) -> None:
    try:
        compiled = compile_sm90(cfg)
    except Exception as exc:  # report and go on with the next config
        print(f"\n## {cfg}: COMPILE FAILED\n{type(exc).__name__}: {str(exc)[:3000]}")
        return
    name = "sta_fwd_gluon_" + "_".join(f"{k}{v}" for k, v in cfg.items())
    usage, sass = cubin_text(compiled.asm["cubin"], name, dump)
    if dump:
        for key in ("ttgir", "llir", "ptx"):
            (dump / f"{name}.{key}").write_text(compiled.asm[key])
        (dump / f"{name}.sass").write_text(sass)
    md = compiled.metadata
    print(f"\n## {cfg}")
    print(usage)
    print(f"shared memory (metadata): {md.shared} bytes; num_warps {md.num_warps}; "
          f"tensordesc_meta {getattr(md, 'tensordesc_meta', None)}")
    ptx = compiled.asm["ptx"]
    regs = sorted(set(f"{k} {n}" for k, n in re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx)))
    arrives = len(re.findall(r"mbarrier\.arrive", ptx))
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)
    print(f"ptx: setmaxnreg {regs}, mbarrier.arrive x{arrives}, wgmma.wait_group {waits}")
    code = instructions(sass)
    total = [sum(mark in t for _, t in code) for mark in MARKS]
    print("| where | addr | instructions | " + " | ".join(MARKS) + " | EX2 with a product in flight |")
    print("|---" * (len(MARKS) + 4) + "|")
    print("| whole kernel | | " + str(len(code)) + " | " + " | ".join(map(str, total)) + " | |")
    # Loops that issue products and exponentials; the smallest is the hot loop (larger
    # ones are the mbarrier retry stubs at the end branching back into the code).
    hot = sorted((b for b in loops(code) if any("HGMMA" in t for t in b[2]) and any("MUFU.EX2" in t for t in b[2])),
                 key=lambda b: len(b[2]))
    for i, (start, end, body) in enumerate(hot[:1]):
        counts = [sum(mark in t for t in body) for mark in MARKS]
        done, exps = overlap(body)
        print(f"| hot loop | {start:#x}-{end:#x} | {len(body)} | " + " | ".join(map(str, counts))
              + f" | {done} of {exps} |")
    if hot:
        done, exps = overlap(hot[0][2])
        print(f"overlap: {'YES' if done else 'NO'} ({done} of {exps} exponentials of the hot loop issue while "
              f"an HGMMA group is in flight)")
    seq = []
    for t in (hot[0][2] if hot else []):
        for key in ("HGMMA", "WARPGROUP.DEPBAR", "MUFU.EX2", "BAR.SYNC", "SYNCS.ARRIVE", "SYNCS.PHASECHK"):
            if key in t:
                label = key + (" " + t.split()[-1] if key == "WARPGROUP.DEPBAR" else "")
                if seq and seq[-1][0] == label:
                    seq[-1][1] += 1
                else:
                    seq.append([label, 1])
    print("hot loop order: " + ", ".join(f"{n}x {k}" for k, n in seq))


def parse_config(text: str) -> dict:
    """``"K_STAGES=2,PINGPONG=0"`` -> ``{"K_STAGES": 2, "PINGPONG": 0}`` (integers; 0/1 for switches)."""
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dump", type=Path, default=None, help="write ttgir/ptx/sass per config here")
    parser.add_argument("--config", action="append", default=None, metavar="K=V,K=V",
                        help="compile these configs instead of the standard list (e.g. V_STAGES=3,PINGPONG=0)")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_90, Hunyuan shape (tile 6x8x8, D=128, bf16)")
    configs = CONFIGS if args.config is None else [parse_config(c) for c in args.config]
    for cfg in configs:
        report(cfg, args.dump)
    if args.config is not None:
        return
    print("\n## other tiles and dtypes of the GPU tests (compile only)")
    lse3 = dict(CONFIGS[2], STORE_LSE=True)  # test_short_windows: fp16, 3+3 stages, LSE
    for tile, dtype, cfg in (((2, 8, 8), "bf16", CONFIGS[0]), ((4, 4, 8), "bf16", CONFIGS[0]),
                             ((6, 8, 8), "fp16", CONFIGS[0]), ((4, 4, 8), "fp16", lse3)):
        try:
            compiled = compile_sm90(cfg, tile=tile, dtype=dtype)
            print(f"tile {tile} {dtype} stages={cfg['K_STAGES']}+{cfg['V_STAGES']}: compiles, {compiled.metadata.shared} bytes shared")
        except Exception as exc:
            print(f"tile {tile} {dtype} stages={cfg['K_STAGES']}+{cfg['V_STAGES']}: COMPILE FAILED: {type(exc).__name__}: {str(exc)[:500]}")


if __name__ == "__main__":
    main()
