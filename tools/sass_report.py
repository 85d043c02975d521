"""Compile the STA kernel for Hopper (sm_90) on a machine without a GPU and report what
the hot loop does: registers and spills, and per loop the tensor-core products (HGMMA),
the waits on them, exponentials, CTA-wide barriers and bulk copies.

Use the device's Triton to see what the device runs (Triton 3.6 there), e.g.

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages:.venv/lib/python3.11/site-packages \\
        /tmp/t36/bin/python tools/sass_report.py --warps 8 --stages 3

Shapes are HunyuanVideo's: tile 6x8x8, head dim 128, bf16, k/v as 5-D bulk copies.
"""

from __future__ import annotations

import argparse
import inspect

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sass import cubin_text, instructions, load_kernel_module, loops

MARKS = ("HGMMA", "WARPGROUP.DEPBAR", "MUFU.EX2", "BAR.SYNC", "UTMALDG", "STL", "LDL")


def compile_sm90(block_m: int, block_n: int, warps: int, stages: int):
    kernel = load_kernel_module("sta_fwd")._sta_fwd_kernel
    plane = 64
    const = dict(TT=6, TH=8, TW=8, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=block_m, BLOCK_N=block_n, EVEN=True,
                 STORE_LSE=False, IEEE=False, TMA=2)
    pointers = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", Q_TILES="*i32", KV_TILES="*i32",
                    HEADS="*i32", qk_scale="fp32")
    box = f"tensordesc<bf16[1,{block_n // plane},8,8,128]>"
    sig = {name: "constexpr" if name in const else box if name.endswith("_DESC") else pointers.get(name, "i32")
           for name in inspect.signature(kernel.fn).parameters}
    return triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-m", type=int, default=128)
    parser.add_argument("--block-n", type=int, default=128)
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--stages", type=int, default=3)
    args = parser.parse_args()
    compiled = compile_sm90(args.block_m, args.block_n, args.warps, args.stages)
    usage, sass = cubin_text(compiled.asm["cubin"], "sta_fwd_sm90")
    print(f"triton {triton.__version__}, sm_90, {vars(args)}")
    print(usage)
    print("| loop | instructions | " + " | ".join(MARKS) + " | exp2 between the first products and their wait |")
    print("|---" * (len(MARKS) + 3) + "|")
    for i, body in enumerate(b for _, _, b in loops(instructions(sass)) if any("HGMMA" in t for t in b)):
        counts = [sum(mark in t for t in body) for mark in MARKS]
        first = next(j for j, t in enumerate(body) if "HGMMA" in t)
        wait = next((j for j, t in enumerate(body) if j > first and "WARPGROUP.DEPBAR" in t), len(body))
        overlap = sum("MUFU.EX2" in t for t in body[first:wait])
        print(f"| {i} | {len(body)} | " + " | ".join(map(str, counts)) + f" | {overlap} |")


if __name__ == "__main__":
    main()
