"""FastVideo 0.1.7's own layers drive sta_dist, installed the user's way.

Each world size runs in spawned gloo ranks with FastVideo's own parallel state (sequence
parallelism over all ranks); outputs are compared with the single reference
(``sta_dist.testing.reference_attention``) within ``error_bound``, or with FastVideo's SDPA
backend. Two ranks are the FastVideo family's shared spawn (tests/world_spawns.py, with
the FastVideo backward of tests/test_training_clients.py). Skipped where FastVideo is not installed (``pip install -e '.[fastvideo-test]'``, then
``pip install --no-deps fastvideo==0.1.7``).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from sta_dist.geometry import fastvideo_window, grid_shape
from sta_dist.parallel.spawn import spawn_local
from sta_dist.testing import error_bound, max_error, reference_attention
from tests import fastvideo_workers as fw
from tests.fastvideo_support import import_fastvideo, skip_without_fastvideo
from tests.world_spawns import shares

pytestmark = pytest.mark.timeout(400)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER1_STEP1 = [[1, 1, 1], [2, 1, 1], [1, 2, 1], [1, 1, 2], [2, 2, 2], [1, 2, 2]]  # even and odd, per head


@pytest.fixture(scope="module")
def fastvideo():
    skip_without_fastvideo()


def write_strategy(path) -> str:
    """A mask strategy in FastVideo's JSON format: 2 steps x 2 layers x 6 heads."""
    entries = {}
    for t in range(2):
        for l in range(2):
            for h in range(fw.H):
                entries[f"{t}_{l}_{h}"] = LAYER1_STEP1[h] if (t, l) == (1, 1) else [3, 3, 3]
    path.write_text(json.dumps(entries))
    return str(path)


@pytest.fixture(scope="module")
def strategy(tmp_path_factory, fastvideo):
    return write_strategy(tmp_path_factory.mktemp("strategy") / "mask_strategy.json")


def assemble(results, text=True):
    """Every rank's natural chunk of the video and the (gathered) text rows -> [B, N + L, H, D]."""
    video = torch.cat([r[0] for r in results], 1)
    return torch.cat([video, results[0][1]], 1) if text else video


def assert_matches_reference(out, q, k, v, tile, window, rows=None):
    kw = dict(canvas=fw.CANVAS, tile=tile, window=window)
    if rows is not None:
        q, k, v = q[:, :rows], k[:, :rows], v[:, :rows]
    ref = reference_attention(q, k, v, **kw)
    base = reference_attention(q, k, v, **kw, compute_dtype=torch.float32)
    err, bound = max_error(out, ref), error_bound(max_error(base, ref), torch.float32, ref)
    assert err <= bound, (err, bound)


def rope(x, cos, sin):
    """FastVideo's own RoPE, applied to the full sequence: the reference's input."""
    import_fastvideo()
    from fastvideo.layers.rotary_embedding import _apply_rotary_emb

    return _apply_rotary_emb(x, cos, sin, is_neox_style=False)


def check_head_mode_per_head_windows_with_text(results):
    q, k, v, _ = fw.inputs(1)
    out = assemble([r["windows"] for r in results])
    grid = grid_shape(fw.CANVAS, (6, 8, 8))
    assert_matches_reference(out, q, k, v, (6, 8, 8), [fastvideo_window(w, grid) for w in LAYER1_STEP1])
    q, k, v, _ = fw.inputs(2)
    out = assemble([r["no_text"] for r in results], text=False)
    assert_matches_reference(out, q, k, v, (6, 8, 8), [fastvideo_window(w, grid) for w in LAYER1_STEP1], rows=fw.N)


def check_head_mode_even_windows_inside_the_grid(results):
    """Tile 3x4x4 on 9x10x14: grid 3x3x4, so FastVideo's even windows take k + 1 tiles."""
    q, k, v, _ = fw.inputs(4)
    grid = grid_shape(fw.CANVAS, (3, 4, 4))
    windows = [fastvideo_window(w, grid) for w in LAYER1_STEP1]
    assert windows[1] == (3, 1, 1) and windows[4] == (3, 3, 3)
    assert_matches_reference(assemble([r["small_tile"] for r in results]), q, k, v, (3, 4, 4), windows)


def check_whole_grid_equals_fastvideos_sdpa_backend(results):
    q, k, v, _ = fw.inputs(3)
    ours, sdpa = assemble([r["whole"] for r in results]), assemble([r["sdpa"] for r in results])
    ref = reference_attention(q, k, v, canvas=fw.CANVAS, tile=(6, 8, 8), window=(2, 2, 2))
    assert max_error(ours, ref) <= error_bound(max_error(sdpa, ref), torch.float32, ref)
    assert max_error(ours, sdpa) <= 2 * error_bound(max_error(sdpa, ref), torch.float32, ref)


def check_local_attention_calls_forward_alone(out):
    q, k, v, _ = fw.inputs(5)
    angles = torch.rand(fw.N + fw.L, fw.D // 2, generator=torch.Generator().manual_seed(5))
    q, k = rope(q, angles.cos(), angles.sin()), rope(k, angles.cos(), angles.sin())
    grid = grid_shape(fw.CANVAS, (6, 8, 8))
    assert_matches_reference(out, q, k, v, (6, 8, 8), [fastvideo_window(w, grid) for w in LAYER1_STEP1])


def check_tile_mode_replaces_the_head_all_to_all(results):
    q, k, v, (cos, sin) = fw.inputs(6)
    q = torch.cat([rope(q[:, :fw.N], cos, sin), q[:, fw.N:]], 1)
    k = torch.cat([rope(k[:, :fw.N], cos, sin), k[:, fw.N:]], 1)
    grid = grid_shape(fw.CANVAS, fw.TILE_MODE_TILE)
    windows = [fastvideo_window(w, grid) for w in LAYER1_STEP1]
    for r in results:  # every rank gathered the whole video; text rows complete on every rank
        out = torch.cat([r["full"], r["text"]], 1)
        assert_matches_reference(out, q, k, v, fw.TILE_MODE_TILE, windows)
        assert r["original"] == fw.N and r["calls"]["all_to_all_4D"] == 0
        assert r["mode"] == "tile"
        assert r["bytes"].get("halo exchange", 0) > 0 and "head all-to-all" not in r["bytes"], r["bytes"]
    assert sum(r["held"] for r in results) == fw.N


def check_search_and_tuning_produce_a_strategy(result):
    candidates = [tuple(c) for c in result["candidates"]]
    grid = grid_shape(fw.CANVAS, (3, 4, 4))
    assert candidates[-1] == grid and len(candidates) > 2
    tuned = result["STA_tuning"]
    assert set(tuned) == {f"{t}_{l}_{h}" for t in range(2) for l in range(2) for h in range(fw.H)}
    for l in range(2):  # step 0 is skipped (full window); step 1 picks the least L2 per head
        q, k, v, _ = fw.inputs(100 + 10 + l)
        full = reference_attention(q, k, v, canvas=fw.CANVAS, tile=(3, 4, 4), window=grid)
        losses = []
        for c in candidates[:-1]:
            cand = reference_attention(q, k, v, canvas=fw.CANVAS, tile=(3, 4, 4), window=fastvideo_window(c, grid))
            losses.append((cand - full).square().mean(dim=(0, 1, 3)))
        losses = torch.stack(losses)  # [candidate, head]
        saved = torch.tensor([result["losses"]["L2_loss"][str(list(c))][1][l] for c in candidates[:-1]])
        assert torch.allclose(saved.double(), losses, atol=2e-6)
        for h in range(fw.H):
            assert tuple(tuned[f"0_{l}_{h}"]) == grid
            chosen = candidates.index(tuple(tuned[f"1_{l}_{h}"]))
            assert losses[chosen, h] <= losses[:, h].min() + 2e-6
    assert set(result["STA_tuning_cfg"]) == set(tuned)


def check_bad_input_names_the_setting(out):
    assert "FASTVIDEO_ATTENTION_CONFIG must name an existing mask-strategy file" in out["missing_file"]
    assert "missing.json" in out["missing_file"]
    assert "head dim must be one of (32, 64, 96, 128, 160, 192, 224, 256), got head_dim=48" in out["head_size"]
    assert "STA_param has no layer 5 (this Impl's layer_idx, prefix='model.blocks.5.attn.impl')" in out["no_layer"]


def run_world(world, strategy, tmp_path):
    """One spawn per world size runs every scenario of it (FastVideo takes ~10 s to import)."""
    return spawn_local(fw.run_all, world, run_all_args(strategy, tmp_path), timeout_s=360)


def run_all_args(strategy, workdir) -> tuple:
    return strategy, str(workdir), str(workdir / "missing.json")


def check_head_mode(results):
    head = [r["head"] for r in results]
    check_head_mode_per_head_windows_with_text(head)
    check_head_mode_even_windows_inside_the_grid(head)
    check_whole_grid_equals_fastvideos_sdpa_backend(head)


def test_fastvideo_layers_on_one_rank(strategy, tmp_path):
    """World size 1: DistributedAttention, LocalAttention, search and tuning, bad input."""
    results = run_world(1, strategy, tmp_path)
    check_head_mode(results)
    check_local_attention_calls_forward_alone(results[0]["local"])
    check_search_and_tuning_produce_a_strategy(results[0]["search"])
    check_bad_input_names_the_setting(results[0]["errors"])


@shares("fastvideo", 2)
def test_fastvideo_sequence_parallel_on_two_ranks(fastvideo, world_spawn):
    """FastVideo's head all-to-all; tile and auto mode instead of it; search over SP."""
    results = world_spawn("fastvideo", 2, "test_fastvideo:run all")
    check_head_mode(results)
    check_tile_mode_replaces_the_head_all_to_all([r["tile"] for r in results])
    check_tile_mode_replaces_the_head_all_to_all([r["auto"] for r in results])
    check_search_and_tuning_produce_a_strategy(results[0]["search"])


def test_fastvideo_sequence_parallel_on_three_ranks(strategy, tmp_path):
    results = run_world(3, strategy, tmp_path)
    check_head_mode(results)
    check_tile_mode_replaces_the_head_all_to_all([r["tile"] for r in results])


def test_installed_by_pth_without_code(fastvideo, tmp_path):
    """``python -m sta_dist.integrations.fastvideo install`` writes a .pth line; a fresh
    interpreter processing that site dir serves sta_dist under FastVideo's module name,
    the denoising stage's identity check included, and imports no torch until then."""
    site = tmp_path / "site"
    cmd = [sys.executable, "-m", "sta_dist.integrations.fastvideo", "install", "--site-dir", str(site)]
    assert "installed" in subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    probe = (
        "import site, sys; site.addsitedir(sys.argv[1]); torch_before = 'torch' in sys.modules\n"
        "from tests.fastvideo_support import import_fastvideo; import_fastvideo()\n"
        "import fastvideo.attention.backends.sliding_tile_attn as m, fastvideo.pipelines.stages.denoising as d\n"
        "print(torch_before, m.SlidingTileAttentionBackend.__module__, d.st_attn_available,\n"
        "      d.SlidingTileAttentionBackend is m.SlidingTileAttentionBackend, m.logger.name)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "FASTVIDEO_LOGGING_LEVEL": "ERROR"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-5:] == ["False", "sta_dist.integrations.fastvideo.backend", "True", "True",
                                      "fastvideo.attention.backends.sliding_tile_attn"]
    off = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "STA_DIST_FASTVIDEO": "0", "FASTVIDEO_LOGGING_LEVEL": "ERROR"})
    assert "sta_dist" not in off.stdout  # FastVideo's own module (or its import error) instead
    cmd[3] = "uninstall"
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    assert not (site / "sta_dist_fastvideo.pth").exists()


def spawn_parts(family: str, world: int, workdir) -> list:
    """This module's scenarios in the FastVideo family's shared spawn of 2 ranks
    (tests/world_spawns.py); its strategy file is written here, into ``workdir``."""
    if (family, world) != ("fastvideo", 2):
        return []
    return [("run all", fw.run_all, run_all_args(write_strategy(workdir / "mask_strategy.json"), workdir))]
