"""The CUDA kernel's build and load (``kernels/sta_fwd_cuda.py``) without a GPU: no
compiler and a failing compiler leave ``library()`` empty with a reason, and a real
``nvcc`` (where this machine has one) builds once into the cache and reuses it; the one
nvcc command, the key over the source's headers, and the host interface: the ctypes
struct against ``sta_fwd_cuda_args.h`` (fields parsed from it, offsets from a C compiler),
the loader's interface check and the struct a launch fills. The real build runs once
(``python -m sta_dist.kernels.sta_fwd_cuda`` into an empty cache), and the cached-build test
reuses what it built."""

import ctypes
import os
import re
import shutil
import stat
import subprocess
import types
from pathlib import Path

import pytest
import torch

from sta_dist.kernels import sta_bwd_cuda, sta_fwd_cuda


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


needs_nvcc = pytest.mark.skipif(sta_fwd_cuda.nvcc() is None, reason="no nvcc on this machine")
one_build = pytest.mark.xdist_group("nvcc-build")  # both tests in one xdist worker: one build (built_ahead)


@pytest.fixture(scope="module")
def built_ahead(tmp_path_factory):
    """The one real build of this module (nvcc takes tens of seconds): ``python -m
    sta_dist.kernels.sta_fwd_cuda`` into an empty cache. Returns the cache and the finished
    process."""
    import sys

    cache = tmp_path_factory.mktemp("cuda_cache")
    done = subprocess.run([sys.executable, "-m", "sta_dist.kernels.sta_fwd_cuda"], capture_output=True, text=True,
                          env=dict(os.environ, STA_DIST_CACHE=str(cache)), timeout=300)
    return cache, done


@pytest.fixture
def built(built_ahead, monkeypatch):
    """A cleared loader with its cache where the command line built the library."""
    cache, done = built_ahead
    monkeypatch.setenv("STA_DIST_CACHE", str(cache))
    sta_fwd_cuda.library.cache_clear()
    sta_fwd_cuda._errors.clear()
    yield cache, done
    sta_fwd_cuda.library.cache_clear()
    sta_fwd_cuda._errors.clear()


@needs_nvcc
@one_build
def test_build_ahead_of_time_from_the_command_line(built):
    """From an empty cache the command line builds the library and prints its path."""
    cache, done = built
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(sta_fwd_cuda.prebuilt())
    assert sta_fwd_cuda.prebuilt().parent == cache / "cuda"


@needs_nvcc
@one_build
def test_real_build_is_cached(built):
    """The library the command line built is reused (in this process): build() returns it
    without compiling again, it loads without a GPU, and it is what a machine without nvcc
    would load."""
    cache, done = built
    assert done.returncode == 0, done.stderr
    compiler = sta_fwd_cuda.nvcc()
    made = Path(done.stdout.strip())
    stamp = os.stat(made).st_mtime_ns
    first = sta_fwd_cuda.build(compiler)
    assert first == made and first.exists() and first.parent == cache / "cuda"
    assert os.stat(first).st_mtime_ns == stamp  # not compiled again
    assert sta_fwd_cuda.build(compiler) == first and os.stat(first).st_mtime_ns == stamp
    assert sta_fwd_cuda.library() is not None  # loads without a GPU (the launch needs one)
    assert sta_fwd_cuda.prebuilt() == first  # what a machine without nvcc would load


# --- the host interface: sta_fwd_cuda_args.h's struct and its ctypes twin ---------------------
C_SCALARS = {"int": ctypes.c_int, "long long": ctypes.c_longlong, "float": ctypes.c_float}


def header_fields(text: str, struct: str = "StaFwdArgs") -> list[tuple[str, type]]:
    """``(name, ctypes type)`` of ``typedef struct <struct> {...}`` in ``text``, in order:
    any pointer ``c_void_p``, ``int``/``long long``/``float`` their ctypes, ``T name[N]``
    an array of N."""
    body = re.search(rf"typedef struct {struct} \{{(.*?)\}} {struct};", text, re.S)
    assert body, f"no typedef struct {struct} {{...}} {struct}; in the header"
    fields = []
    for decl in re.sub(r"/\*.*?\*/", " ", body.group(1), flags=re.S).split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        m = re.fullmatch(r"(.+?) ?(\*?) ?(\w+)(?:\[(\d+)\])?", decl)
        assert m and "," not in decl, f"one plain declaration a field, got {decl!r}"
        base, star, name, n = m.groups()
        ctype = ctypes.c_void_p if star else C_SCALARS[base.removeprefix("const ")]
        fields.append((name, ctype * int(n) if n else ctype))
    return fields


def test_ctypes_struct_matches_the_header():
    """Names, order and C types of every field, as the header declares them (the forward's
    and the backward's)."""
    assert header_fields(sta_fwd_cuda.ARGS_HEADER.read_text()) == list(sta_fwd_cuda.StaFwdArgs._fields_)
    assert len(sta_fwd_cuda.StaFwdArgs._fields_) == 49  # the 49 arguments the positional call had
    assert (header_fields(sta_bwd_cuda.ARGS_HEADER.read_text(), "StaBwdArgs")
            == list(sta_bwd_cuda.StaBwdArgs._fields_))


def test_a_swapped_field_is_caught():
    """Two int fields swapped (the drift a positional list hid) break the comparison."""
    text = sta_fwd_cuda.ARGS_HEADER.read_text()
    swapped = re.sub(r"int q_stride;(.*?)int n_q_tiles;", r"int n_q_tiles;\1int q_stride;", text, flags=re.S)
    assert swapped != text
    assert header_fields(swapped) != list(sta_fwd_cuda.StaFwdArgs._fields_)
    widened = text.replace("int clip[6];", "int clip[7];")
    assert header_fields(widened) != list(sta_fwd_cuda.StaFwdArgs._fields_)


def compile_c(tmp_path, name: str, source: str, shared: bool) -> Path:
    out = tmp_path / (f"{name}.so" if shared else name)
    (tmp_path / f"{name}.c").write_text(source)
    subprocess.run([CC, *(["-shared", "-fPIC"] if shared else []), "-I", str(sta_fwd_cuda.KERNELS), "-o", str(out),
                    str(tmp_path / f"{name}.c")], check=True, capture_output=True, text=True)
    return out


CC = shutil.which("cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on this machine")


@needs_cc
@pytest.mark.parametrize("struct, header", [("StaFwdArgs", "sta_fwd_cuda_args.h"),
                                            ("StaBwdArgs", "sta_bwd_cuda_args.h")])
def test_ctypes_layout_is_the_c_compilers(tmp_path, struct, header):
    """Every field's offset and the size, as a C compiler lays the header's struct out."""
    twin = getattr(sta_fwd_cuda if struct == "StaFwdArgs" else sta_bwd_cuda, struct)
    names = [name for name, _ in twin._fields_]
    probe = compile_c(tmp_path, "layout", f'#include <stddef.h>\n#include <stdio.h>\n#include "{header}"\n'
                      "int main(void) {\n" + "".join(f'  printf("%zu\\n", offsetof({struct}, {n}));\n'
                                                      for n in names)
                      + f'  printf("%zu\\n", sizeof({struct}));\n  return 0;\n}}\n', shared=False)
    got = [int(x) for x in subprocess.run([str(probe)], capture_output=True, text=True, check=True).stdout.split()]
    assert got == [getattr(twin, n).offset for n in names] + [ctypes.sizeof(twin)]


FAKE_ENTRY = """#include "sta_fwd_cuda_args.h"
int sta_fwd_cuda_args_size(void) { return (int)sizeof(StaFwdArgs) + SIZE_OFF; }
int sta_fwd_cuda_launch(const StaFwdArgs* a) {
  return a->TW + 10 * a->clip[5] + 100 * (int)a->sel_strides[4] + 1000 * (a->stream == (void*)0x1234) +
         10000 * (a->lse == 0);
}
"""


@needs_cc
def test_load_checks_the_interface(tmp_path):
    """A library of the header's interface loads and reads the struct passed by pointer;
    one of another size, or one with the positional entry of before, is refused."""
    lib = sta_fwd_cuda.load(compile_c(tmp_path, "same", "#define SIZE_OFF 0\n" + FAKE_ENTRY, shared=True))
    args = sta_fwd_cuda.StaFwdArgs(TW=8, clip=(ctypes.c_int * 6)(0, 0, 0, 1, 2, 3),
                                   sel_strides=(ctypes.c_longlong * 5)(0, 0, 0, 0, 7), stream=0x1234, lse=None)
    assert lib.sta_fwd_cuda_launch(ctypes.byref(args)) == 8 + 30 + 700 + 1000 + 10000
    with pytest.raises(OSError, match=r"sizeof\(StaFwdArgs\) is \d+ there"):
        sta_fwd_cuda.load(compile_c(tmp_path, "other", "#define SIZE_OFF 8\n" + FAKE_ENTRY, shared=True))
    with pytest.raises(OSError, match="has no sta_fwd_cuda_launch"):
        sta_fwd_cuda.load(compile_c(tmp_path, "old", "int sta_fwd_cuda(void) { return 0; }\n", shared=True))


def test_launch_fills_the_struct(monkeypatch):
    """The launcher's struct for a packed call with a halo, the log-sum-exp, a clip box and
    a resume (CPU tensors; the library and the stream stand in)."""
    got = []

    class Lib:
        def sta_fwd_cuda_launch(self, ref):
            got.append(ref._obj)
            return 0

    monkeypatch.setattr(sta_fwd_cuda, "library", lambda: Lib())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0x1234))
    B, S, D = 2, 2 * 128 + 16, 128
    q = torch.zeros(B, S, 3, D, dtype=torch.float16)
    k, v = torch.zeros(B, S + 8, 1, D, dtype=torch.float16), torch.zeros(B, S + 8, 1, D, dtype=torch.float16)
    kh = torch.zeros(B, 40, 1, D, dtype=torch.float16)
    heads = torch.tensor([[3, 3, 3, 0, 0], [1, 1, 1, 0, 2]], dtype=torch.int32)
    q_tiles = torch.tensor([[0, 0, 9], [3, 128, 9]], dtype=torch.int32)
    kv_tiles = torch.tensor([[0], [128], [~5], [~40]], dtype=torch.int32)
    out, lse = torch.zeros_like(q), torch.zeros(B, 3, S, dtype=torch.float32)
    sta_fwd_cuda.sta_fwd_cuda(q, k, v, heads, out, canvas=(4, 8, 8), tile=(2, 8, 8), scale=0.125, text_keys=16,
                              order="packed", tables=(q_tiles, kv_tiles, 256), lse=lse, halo=(kh, torch.zeros_like(kh)),
                              clip=((0, 0, 0), (1, 1, 1)), resume=True)
    a, = got
    assert (a.q, a.k, a.out, a.lse, a.heads, a.n_heads) == (q.data_ptr(), k.data_ptr(), out.data_ptr(),
                                                            lse.data_ptr(), heads.data_ptr(), 2)
    assert (a.q_tiles, a.q_stride, a.n_q_tiles, a.kv_tiles, a.kv_stride) == (q_tiles.data_ptr(), 3, 2,
                                                                               kv_tiles.data_ptr(), 1)
    assert (a.packed, a.f16, a.B, a.T, a.H, a.W, a.TT, a.TH, a.TW, a.q_heads, a.kv_heads) == (1, 1, 2, 4, 8, 8, 2, 8,
                                                                                              8, 3, 1)
    assert (a.s_q, a.s_kv, a.sq_b, a.sq_s, a.sk_b, a.sk_s, a.so_b, a.so_s, a.lse_b, a.lse_h) == (
        S, S + 8, S * 3 * D, 3 * D, (S + 8) * D, D, S * 3 * D, 3 * D, 3 * S, S)
    assert (a.sel_keys, a.sel_counts, list(a.sel_strides), a.text_row, a.n_text) == (None, None, [0] * 5, 256, 16)
    assert (a.k_halo, a.halo_rows, a.sh_b, a.sh_s) == (kh.data_ptr(), 40, 40 * D, D)
    assert (list(a.clip), a.resume, a.stream) == ([0, 0, 0, 1, 1, 1], 1, 0x1234)
    assert a.scale == pytest.approx(0.125 * sta_fwd_cuda.LOG2E)


# --- the build: one nvcc invocation, headers from kernels/, a key over the headers ------------
def test_one_nvcc_invocation_with_the_kernels_folder_on_the_include_path(fresh, monkeypatch):
    """What the build runs, recorded by a stand-in compiler: the flags, ``-I kernels/`` and
    the one source; the library lands under the source's key."""
    log = fresh / "argv"
    fake = fresh / "nvcc"
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    f"printf '%s\\n' \"$@\" > {log}\nwhile [ \"$1\" != -o ]; do shift; done\ntouch \"$2\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    built = sta_fwd_cuda.build(str(fake))
    argv = log.read_text().splitlines()
    assert argv[:len(sta_fwd_cuda.NVCC_FLAGS)] == list(sta_fwd_cuda.NVCC_FLAGS)
    assert argv[len(sta_fwd_cuda.NVCC_FLAGS):] == ["-I", str(sta_fwd_cuda.KERNELS), "-o", argv[-2],
                                                    str(sta_fwd_cuda.SOURCE)]
    assert built.name.startswith(f"sta_fwd_cuda_{sta_fwd_cuda.source_key()}_") and built.exists()


def test_the_source_includes_its_headers():
    names = [name for name, _ in sta_fwd_cuda.headers()]
    assert names == ["hopper/ptx.cuh", "hopper/tensor_maps.cuh", "sta_fwd_cuda_args.h"]
    assert all(path.is_file() and path.is_relative_to(sta_fwd_cuda.KERNELS) for _, path in sta_fwd_cuda.headers())


def test_the_key_covers_every_header(tmp_path):
    """A changed header (or source) is another key, so another library; a source from
    elsewhere takes the headers beside it first, the rest from kernels/."""
    copy = tmp_path / "k"
    shutil.copytree(sta_fwd_cuda.KERNELS, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    source = copy / "sta_fwd_cuda.cu"
    base = sta_fwd_cuda.source_key(source)
    assert base == sta_fwd_cuda.source_key()
    for name, _ in sta_fwd_cuda.headers():
        header = copy / name
        text = header.read_text()
        header.write_text(text + "\n")
        assert sta_fwd_cuda.source_key(source) != base, name
        header.write_text(text)
    assert sta_fwd_cuda.source_key(source) == base
    (copy / "hopper" / "ptx.cuh").unlink()  # now from kernels/ (-I): the same text, the same key
    assert [p for _, p in sta_fwd_cuda.headers(source)][0] == sta_fwd_cuda.KERNELS / "hopper" / "ptx.cuh"
    assert sta_fwd_cuda.source_key(source) == base


def test_the_package_ships_the_source_and_its_headers():
    """pyproject's package data for sta_dist.kernels names every file the build reads."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["sta_dist.kernels"]
    shipped = {p for pattern in patterns for p in (root / "kernels").glob(pattern)}
    source = root / "kernels" / "sta_fwd_cuda.cu"
    needed = {source, *(path for _, path in sta_fwd_cuda.headers(source))}
    assert needed <= shipped, sorted(map(str, needed - shipped))
