"""Shared by the offline compile checks (``sass_report.py``, ``gluon_compile_check.py``):
import a kernel module from ``kernels/`` without installing the package, run the bundled
``cuobjdump`` on a cubin, and split SASS into instructions and loops."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parents[1]


def load_kernel_module(name: str):
    """``kernels/<name>.py`` as the module ``kernels.<name>`` of the repo root, without
    installing the package (its relative imports resolve inside ``kernels/``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"kernels.{name}")


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
