"""The CUDA kernel's build and load (``sta_dist/kernels/sta_fwd_cuda.py``) without a GPU: no
compiler and a failing compiler leave ``library()`` empty with a reason, and a real
``nvcc`` (where this machine has one) builds once into the cache and reuses it."""

import os
import stat

import pytest
import torch

from sta_dist.kernels import sta_fwd_cuda


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A cleared loader with its cache in ``tmp_path``."""
    monkeypatch.setenv("STA_DIST_CACHE", str(tmp_path))
    sta_fwd_cuda.library.cache_clear()
    sta_fwd_cuda._errors.clear()
    yield tmp_path
    sta_fwd_cuda.library.cache_clear()
    sta_fwd_cuda._errors.clear()


def test_no_compiler(fresh, monkeypatch):
    monkeypatch.delenv("STA_DIST_NVCC", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(fresh / "no-cuda"))
    monkeypatch.setattr(sta_fwd_cuda.shutil, "which", lambda name: None)
    assert sta_fwd_cuda.nvcc() is None
    assert sta_fwd_cuda.library() is None and not sta_fwd_cuda.available()
    assert "no nvcc" in sta_fwd_cuda.build_error()


def test_failing_compiler(fresh, monkeypatch):
    fake = fresh / "nvcc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\necho 'boom: no sm_90a' >&2\n"
                    "exit 2\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("STA_DIST_NVCC", str(fake))
    assert sta_fwd_cuda.library() is None
    assert "boom: no sm_90a" in sta_fwd_cuda.build_error() and str(fake) in sta_fwd_cuda.build_error()
    assert not list((fresh / "cuda").glob("*.so*")), "a failed build leaves nothing in the cache"


def test_cpu_tensors_are_not_supported():
    from sta_dist.dispatch import device_facts
    from sta_dist.route import Call, cuda_rule

    q = torch.zeros(1, 2 * 8 * 8, 1, 128, dtype=torch.bfloat16)
    call = Call.of(q, q, q, (2, 8, 8), (2, 8, 8), "natural")
    assert cuda_rule(call, device_facts(q.device)) == "needs a CUDA GPU, the tensors are on cpu"


@pytest.mark.skipif(sta_fwd_cuda.nvcc() is None, reason="no nvcc on this machine")
def test_real_build_is_cached(fresh):
    compiler = sta_fwd_cuda.nvcc()
    first = sta_fwd_cuda.build(compiler)
    assert first.exists() and first.parent == fresh / "cuda"
    stamp = os.stat(first).st_mtime_ns
    assert sta_fwd_cuda.build(compiler) == first and os.stat(first).st_mtime_ns == stamp
    assert sta_fwd_cuda.library() is not None  # loads without a GPU (the launch needs one)
