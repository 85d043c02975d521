"""Prove on a machine without a GPU that the table path (``TABLE``, window plus selected
tiles) leaves the window path's code alone: compile ``sta_dist/kernels/sta_fwd.py``'s kernel for
Hopper (sm_90) at HunyuanVideo's shape with ``TABLE`` off, and the kernel of a git ref
(default ``main``) the same way, for each bulk-copy mode (TMA 2: natural order, 1: packed
tiles, 0: gathered rows), and compare their SASS instruction by instruction (the constant
bank offsets of the parameters aside: the table path adds parameters). Also compiles the
table path itself.

    python tools/table_sass_check.py [--ref main]
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sass import KERNELS, ROOT, cubin_text, load_kernel_module


def _show(ref: str, name: str) -> str:
    """A kernel file at ``ref``: in ``kernels/``, or ``sta_dist/kernels/`` where it lived for a while."""
    for folder in (KERNELS.relative_to(ROOT), "sta_dist/kernels"):
        found = subprocess.run(["git", "show", f"{ref}:{folder}/{name}"], cwd=ROOT, capture_output=True, text=True)
        if found.returncode == 0:
            return found.stdout
    raise SystemExit(f"table_sass_check: {name} is in neither kernels/ nor sta_dist/kernels/ at {ref}")


def compile_sm90(module, tma: int, extra: dict):
    kernel = module._sta_fwd_kernel
    const = dict(TT=6, TH=8, TW=8, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=128, EVEN=True,
                 STORE_LSE=False, IEEE=False, TMA=tma, **extra)
    pointers = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", Q_TILES="*i32", KV_TILES="*i32",
                    HEADS="*i32", qk_scale="fp32", SEL_KEYS="*i32", SEL_COUNT="*i32")
    box = "tensordesc<bf16[1,2,8,8,128]>" if tma == 2 else "tensordesc<bf16[128,128]>"
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_DESC"):
            sig[name] = box if tma else "constexpr"
            if not tma:
                const[name] = None
        else:
            sig[name] = pointers.get(name, "i32")
    return triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=8, num_stages=3))


def sass_lines(compiled, name: str) -> tuple[str, list[str]]:
    usage, sass = cubin_text(compiled.asm["cubin"], name)
    found = [re.sub(r"/\*[0-9a-f]+\*/", "", line).strip() for line in sass.splitlines()
             if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    return usage, [re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[0x0][param]", line) for line in found]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="main", help="git ref whose kernel is the baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp)
        for name in ("sta_fwd.py", "descriptors.py"):
            text = _show(args.ref, name)
            (base_dir / name).write_text(text)
        base, mine = (load_kernel_module("sta_fwd", base_dir, "kernels_base"),
                      load_kernel_module("sta_fwd", KERNELS, "kernels_mine"))
        same = True
        for tma in (2, 1, 0):
            u0, a = sass_lines(compile_sm90(base, tma, {}), f"base_tma{tma}")
            u1, b = sass_lines(compile_sm90(mine, tma, dict(TABLE=False, SEL_KEYS=None, SEL_COUNT=None)),
                               f"mine_tma{tma}")
            print(f"TMA={tma}: {len(a)} vs {len(b)} instructions, the same: {a == b}\n  {args.ref}: {u0}\n  now: {u1}")
            if a != b:
                same = False
                print("\n".join(list(difflib.unified_diff(a, b, lineterm="", n=1))[:60]))
        usage, _ = sass_lines(compile_sm90(mine, 2, dict(TABLE=True)), "table_tma2")
        print(f"table path (TMA=2) compiles: {usage}")
    print(f"triton {triton.__version__}: the window path is {'unchanged' if same else 'CHANGED'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
