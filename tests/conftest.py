"""Test setup: the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, before
any test module imports sta_dist. The interpreter's repeated language patch is skipped
(tests/interpreter_patch.py: the same semantics, a fifth less of its time).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import interpreter_patch

    interpreter_patch.install()

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def world_spawn(tmp_path_factory):
    """The process groups shared by the tests of several modules (tests/world_spawns.py):
    ``world_spawn(family, world, "module:part")`` gives that part's per-rank results."""
    from tests.world_spawns import WorldSpawn

    return WorldSpawn(tmp_path_factory.mktemp("spawns"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """``--dist loadgroup`` (pyproject.toml) sends the tests of one ``xdist_group`` to one
    worker by a suffix of their node ids, ``...@group``, which the worker adds after
    collection. pytest 9.2 derives ``item.nodeid`` from ``item._id`` and no longer from the
    ``item._nodeid`` that pytest-xdist 3.8 sets, so the suffix is lost and the groups are
    scattered over the workers (each then starting its own copy of a shared spawn, see
    tests/world_spawns.py). Here, in a worker of such a run, a marked test whose node id
    lacks the suffix gets it the way pytest 9.2 keeps node ids."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        nodeid = item.nodeid
        if not names or nodeid.rfind("@") > nodeid.rfind("]") or not hasattr(item, "_id"):
            continue
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(f"{nodeid}@{'_'.join(names)}")
