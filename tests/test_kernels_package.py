"""The kernels (``kernels/``, installed as ``sta_dist.kernels``) stand alone: no module of
theirs imports the runtime above them (read from the source, function bodies included),
they import as a package of their own with no ``sta_dist`` loaded, and the route's CUDA
refusals are the kernel's own rules (``kernels/rules.py``)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sta_dist.kernels import rules
from sta_dist.route import Call, Device, cuda_rule

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
MODULES = sorted(KERNELS.rglob("*.py"))


def imported(text: str, rel: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``text`` (the module at ``rel`` in
    ``kernels/``), nested ones too; relative imports resolved against ``sta_dist.kernels``
    (a ``..`` one leaves it)."""
    package = ["sta_dist", "kernels", *rel.parent.parts]
    found = []
    for node in ast.walk(ast.parse(text, str(rel))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level <= len(package) else ["<outside>"]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module))
    return sorted(found)


def runtime_imports(text: str, rel: Path) -> list[str]:
    return [f"{rel}:{line} imports {name}" for line, name in imported(text, rel)
            if (name == "sta_dist" or name.startswith("sta_dist.") or name.startswith("<outside>"))
            and not (name == "sta_dist.kernels" or name.startswith("sta_dist.kernels."))]


def test_every_kernel_module_is_read():
    assert {p.name for p in MODULES} >= {"__init__.py", "descriptors.py", "rules.py", "sta_fwd.py", "sta_fwd_cuda.py",
                                         "tile_sums.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(KERNELS)))
def test_kernels_import_nothing_from_the_runtime(path):
    assert runtime_imports(path.read_text(), path.relative_to(KERNELS)) == []


def test_the_check_sees_a_runtime_import():
    """The check is not vacuous: an import of the runtime, relative, absolute or inside a
    function body, is found; the kernels' own imports are not."""
    text = ("from .descriptors import natural_box\n"
            "def f():\n    from ..geometry import grid_shape\n    import sta_dist.route\n"
            "from sta_dist.kernels import rules\nfrom . import rules\nfrom ... import x\n")
    assert runtime_imports(text, Path("probe.py")) == ["probe.py:3 imports sta_dist.geometry",
                                                       "probe.py:4 imports sta_dist.route",
                                                       "probe.py:7 imports <outside>"]
    assert runtime_imports("from .. import rules\nfrom ..x import y\n", Path("hopper/probe.py")) == []


def test_kernels_import_as_a_package_of_their_own():
    """Loaded from the folder under another package name (as tools/sass.py does), every
    kernel module imports with no ``sta_dist`` module loaded."""
    names = [p.stem for p in MODULES if p.name != "__init__.py"]
    code = (f"import importlib, sys, types\n"
            f"pkg = types.ModuleType('standalone_kernels'); pkg.__path__ = [{str(KERNELS)!r}]\n"
            f"sys.modules['standalone_kernels'] = pkg\n"
            f"for name in {names!r}: importlib.import_module('standalone_kernels.' + name)\n"
            f"print(sorted(m for m in sys.modules if m == 'sta_dist' or m.startswith('sta_dist.')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


CALLS = [  # the first runs; each other one breaks one rule
    dict(dtype="bfloat16", head_dim=128, canvas=(30, 48, 80), tile=(6, 8, 8), order="natural"),
    dict(dtype="float16", head_dim=128, canvas=(30, 48, 80), tile=(6, 8, 8), order="packed", text_keys=256),
    dict(dtype="float32", head_dim=128, canvas=(30, 48, 80), tile=(6, 8, 8), order="natural"),
    dict(dtype="bfloat16", head_dim=64, canvas=(30, 48, 80), tile=(6, 8, 8), order="natural"),
    dict(dtype="bfloat16", head_dim=128, canvas=(30, 48, 81), tile=(6, 8, 8), order="natural"),
    dict(dtype="bfloat16", head_dim=128, canvas=(30, 48, 80), tile=(6, 8, 8), order="natural", bulk_copy=False),
    dict(dtype="bfloat16", head_dim=128, canvas=(30, 48, 80), tile=(6, 8, 8), order="other"),
    dict(dtype="bfloat16", head_dim=128, canvas=(9, 48, 80), tile=(3, 8, 8), order="packed"),
    dict(dtype="bfloat16", head_dim=128, canvas=(128 * 4096, 1024, 1), tile=(128, 1, 1), order="packed"),
]


def rule_fields(call: dict) -> dict:
    """The kernel rule's arguments for a call of ``CALLS`` (k/v: the video rows alone)."""
    video = call["canvas"][0] * call["canvas"][1] * call["canvas"][2]
    return {"text_keys": 0, "bulk_copy": True, "kv_rows": video, "kv_video": video, **call}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("device", [Device.hopper(), Device("cuda", (8, 0)), Device.cpu(),
                                    Device("cuda", (9, 0), cuda_library="no nvcc")])
def test_the_route_refuses_by_the_kernel_rules(call, device):
    """``route.cuda_rule`` is the kernel's device rule, then the library, then its call
    rule, with the same words."""
    fields = rule_fields(call)
    described = Call(heads=4, q_rows=fields["kv_video"], **fields)
    want = (rules.cuda_device_reason(device.type, device.capability) or device.cuda_library
            or rules.cuda_call_reason(**fields))
    assert cuda_rule(described, device) == want


def test_the_calls_reach_every_reason():
    """The first of ``CALLS`` runs and each other one is refused for a reason of its own,
    so the comparison above covers every branch of the call rule."""
    reasons = [rules.cuda_call_reason(**rule_fields(c)) for c in CALLS]
    starts = [None, "needs 256 text keys after", "is built for bfloat16 and float16", "is built for head dim",
              "needs whole tiles", "reads rows through the copy engine", "reads the natural canvas or whole tiles",
              "reads blocks of 128 rows", "numbers tiles below"]
    assert len(reasons) == len(starts)
    assert all(r is s if s is None else r.startswith(s) for r, s in zip(reasons, starts)), reasons


def test_kernel_rules_give_their_reasons():
    base = dict(dtype="bfloat16", head_dim=128, canvas=(30, 48, 80), tile=(6, 8, 8), order="natural",
                kv_rows=115200, kv_video=115200, text_keys=0, bulk_copy=True)
    assert rules.cuda_call_reason(**base) is None
    assert rules.cuda_call_reason(**dict(base, head_dim=64)) == "is built for head dim 128, got head_dim=64"
    assert rules.cuda_call_reason(**dict(base, text_keys=9)) == (
        "needs 9 text keys after k/v row 115200, k/v hold 115200 rows")
    assert rules.cuda_device_reason("cpu", None) == "needs a CUDA GPU, the tensors are on cpu"
    assert rules.cuda_device_reason("cuda", (10, 0)) == "needs Hopper (sm_90), this GPU is sm_100"
    assert rules.cuda_device_reason("cuda", (9, 0)) is None
