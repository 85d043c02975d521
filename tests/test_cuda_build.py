"""The CUDA kernel's build and load (``kernels/sta_fwd_cuda.py``) without a GPU: no
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


def no_compiler(fresh, monkeypatch):
    monkeypatch.delenv("STA_DIST_NVCC", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(fresh / "no-cuda"))
    monkeypatch.setattr(sta_fwd_cuda.shutil, "which", lambda name: None)


def test_no_compiler_and_nothing_prebuilt(fresh, monkeypatch):
    no_compiler(fresh, monkeypatch)
    assert sta_fwd_cuda.nvcc() is None
    assert sta_fwd_cuda.library() is None and not sta_fwd_cuda.available()
    assert sta_fwd_cuda.build_error() == sta_fwd_cuda.missing()
    assert "needs nvcc to build" in sta_fwd_cuda.missing() and "python -m sta_dist.kernels.sta_fwd_cuda" in \
        sta_fwd_cuda.missing()


def test_without_a_compiler_a_library_built_ahead_for_this_source_is_loaded(fresh, monkeypatch):
    """The loader tries the prebuilt file of this source (any compiler), not another
    source's: a file that is no library fails to load with the path named."""
    no_compiler(fresh, monkeypatch)
    (fresh / "cuda").mkdir()
    (fresh / "cuda" / "sta_fwd_cuda_0123456789abcdef_00000000.so").write_bytes(b"other source")
    assert sta_fwd_cuda.prebuilt() is None and sta_fwd_cuda.missing() is not None
    mine = fresh / "cuda" / f"sta_fwd_cuda_{sta_fwd_cuda.source_key()}_00000000.so"
    mine.write_bytes(b"not a library")
    assert sta_fwd_cuda.prebuilt() == mine and sta_fwd_cuda.missing() is None
    assert sta_fwd_cuda.library() is None
    assert sta_fwd_cuda.build_error().startswith(f"loading {mine} failed")


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
    assert sta_fwd_cuda.prebuilt() == first  # what a machine without nvcc would load


@pytest.mark.skipif(sta_fwd_cuda.nvcc() is None, reason="no nvcc on this machine")
def test_build_ahead_of_time_from_the_command_line(fresh):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sta_dist.kernels.sta_fwd_cuda"], capture_output=True, text=True,
                          env=dict(os.environ, STA_DIST_CACHE=str(fresh)), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(sta_fwd_cuda.prebuilt())
