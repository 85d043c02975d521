"""Shared by the offline compile checks (``sass_report.py``, ``table_sass_check.py``):
import a kernel module from ``kernels/`` without importing the package, run the bundled
``cuobjdump`` on a cubin, and split SASS into instructions and loops."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parents[1]


KERNELS = ROOT / "kernels"


def load_kernel_module(name: str, kernels_dir: Path = KERNELS, tag: str = "kernels"):
    """``<kernels_dir>/<name>.py`` as a module of a package of its own named ``tag`` (its
    relative imports resolve inside ``kernels_dir``), without importing ``sta_dist``; a
    copy of the kernels from another commit loads beside the tree's under another tag."""
    if tag not in sys.modules:
        pkg = types.ModuleType(tag)
        pkg.__path__ = [str(kernels_dir)]
        sys.modules[tag] = pkg
    spec = importlib.util.spec_from_file_location(f"{tag}.{name}", Path(kernels_dir) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cubin_text(cubin: bytes, name: str, out: Path | None = None) -> tuple[str, str]:
    """``(resource-usage line, SASS)`` of ``cubin``, written as ``<out>/<name>.cubin``."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    out = out or Path(os.environ.get("TMPDIR", "/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", path], capture_output=True, text=True).stdout
    sass = subprocess.run([tools / "cuobjdump", "-sass", path], capture_output=True, text=True).stdout
    return next((line.strip() for line in usage.splitlines() if "REG" in line), usage.strip()), sass


def instructions(sass: str) -> list[tuple[int, str]]:
    found = (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines())
    return [(int(m.group(1), 16), m.group(2)) for m in found if m]


def loops(code: list[tuple[int, str]]) -> list[tuple[int, int, list[str]]]:
    """Bodies of backward branches: ``(start, end, instructions)``."""
    bodies = []
    for addr, text in code:
        target = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            bodies.append((start, addr, [t for a, t in code if start <= a <= addr]))
    return bodies
