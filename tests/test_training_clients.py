"""Training through the clients: one SGD step of a tiny random-weight Wan 2.1 and
HunyuanVideo transformer with ``sta_dist.diffusers.enable(..., parallel=...)`` on 1, 2 and 3
gloo ranks (tile and head mode, and with diffusers' gradient checkpointing of every block)
equals one process's step. The reference is the float64 step of diffusers' own attention
under the STA mask (no sta_dist code); every step's gradients and parameters after the
step must be within twice the float32 reference step's own error plus an ulp. Planted
wrong adjoints (the output gather's backward summing over ranks; the text rows' whole
gradient kept on every rank) must fail the same check.

FastVideo: one backward through its own ``DistributedAttention`` with sta_dist as its
SLIDING_TILE_ATTN backend (FastVideo's head all-to-all, and sta_dist's tile mode with the
model's shard and gather points) on 1 and 2 gloo ranks equals the reference's autograd."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from sta_dist.testing import error_bound, max_error  # noqa: E402
from tests import training_workers as tw  # noqa: E402
from tests.world_spawns import on_world, shares  # noqa: E402

pytestmark = pytest.mark.timeout(400)
MODELS = ("wan", "hunyuan")


def flat(tensors: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for _, t in sorted(tensors.items())])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: intra-op threads only contend with the spawned ranks for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references():
    """Per model: the float64 and float32 reference steps (diffusers' attention, masked)."""
    return {name: (tw.reference_step(name, torch.float64), tw.reference_step(name, torch.float32)) for name in MODELS}


def step_errors(result: dict, ref: dict, base: dict) -> dict:
    """``{"grads"|"params": (error, bound)}`` of one step against the float64 reference."""
    out = {}
    for what in ("grads", "params"):
        assert sorted(result[what]) == sorted(ref[what]), what  # the same parameters got gradients
        r = flat(ref[what])
        out[what] = (max_error(flat(result[what]), r), error_bound(max_error(flat(base[what]), r), torch.float32, r))
    return out


def check_step(result: dict, ref: dict, base: dict, what: str) -> None:
    for name, (err, bound) in step_errors(result, ref, base).items():
        assert err <= bound, f"{what}: {name} error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("name", MODELS)
def test_one_process_step_and_checkpointing(name, references):
    ref, base = references[name]
    plain, ckpt = tw.sta_step(name), tw.sta_step(name, checkpoint=True)
    check_step(plain, ref, base, f"{name} one process")
    layers = plain["attention_calls"]
    assert ckpt["attention_calls"] == 2 * layers  # every block ran again in the backward
    for what in ("grads", "params"):  # the recompute is the same computation
        assert all(torch.equal(ckpt[what][n], plain[what][n]) for n in plain[what]), what


def parallel_runs(ranks: int) -> list:
    modes = ("tile",) if ranks == 1 else ("tile", "head")  # one rank: both are the local call
    runs = [(name, mode, False, None) for name in MODELS for mode in modes]
    if ranks == 2:
        runs += [(name, "tile", True, None) for name in MODELS]
    if ranks == 3:
        runs += [("wan", "tile", False, "gather sums"), ("hunyuan", "tile", False, "text whole")]
    return runs


RANKS = (1, 2, 3)


@pytest.fixture(scope="module")
def parallel_results(world_spawn):
    """Every group size's steps from one spawn of 3 processes (groups of the first 1, 2, 3):
    the diffusers family's shared spawn of 3 ranks (tests/world_spawns.py)."""
    return world_spawn("diffusers", max(RANKS), "test_training_clients:parallel steps")


@pytest.mark.parametrize("ranks", [pytest.param(r, marks=on_world("diffusers", max(RANKS))) for r in RANKS])
def test_parallel_step_equals_one_process(ranks, references, parallel_results):
    runs = parallel_runs(ranks)
    for i, (name, mode, checkpoint, planted) in enumerate(runs):
        what = f"{name} parallel={mode!r} on {ranks} ranks" + (", checkpointed" if checkpoint else "")
        steps = [parallel_results[r][ranks][i] for r in range(ranks)]
        for r, result in enumerate(steps):  # the ranks take the same step
            for key in ("grads", "params"):
                assert all(torch.equal(result[key][n], steps[0][key][n]) for n in result[key]), (what, r, key)
        if checkpoint:  # every block ran again in the backward, the same computation
            plain = parallel_results[0][ranks][runs.index((name, mode, False, None))]
            assert steps[0]["attention_calls"] == 2 * plain["attention_calls"]
            for key in ("grads", "params"):
                assert all(torch.equal(steps[0][key][n], plain[key][n]) for n in plain[key]), (what, key)
        if planted is None:
            check_step(steps[0], *references[name], what)
        else:
            errors = step_errors(steps[0], *references[name])
            assert errors["grads"][0] > 10 * errors["grads"][1], f"{what} with {planted!r} planted passed: {errors}"


@pytest.fixture(scope="module")
def fastvideo():
    from tests.fastvideo_support import skip_without_fastvideo

    skip_without_fastvideo()


def fastvideo_errors(grads: list, reference: list) -> list:
    """Per input: ``(error, bound)`` of the ranks' summed gradient against float64."""
    (ref, base), total = reference, [sum(g[j] for g in grads) for j in range(3)]
    return [(max_error(t, r), error_bound(max_error(b, r), torch.float32, r)) for t, r, b in zip(total, ref, base)]


@shares("fastvideo", 2)
def test_fastvideo_backward_equals_one_process(fastvideo, world_spawn):
    from tests import fastvideo_workers as fw

    world = 2
    results = world_spawn("fastvideo", world, "test_training_clients:fastvideo grads")
    refs = results[0]
    cases = {("tile", world, True): (fw.TILE_MODE_TILE, True), ("head", world, False): ((3, 4, 4), False),
             ("head", 1, True): ((3, 4, 4), True)}
    for key, (tile, text) in cases.items():
        ranks = world if key[1] == world else 1  # a group of one: each rank alone, rank 0's checked
        for j, (err, bound) in enumerate(fastvideo_errors([results[r][key] for r in range(ranks)],
                                                          refs[("reference", tile, text)])):
            assert err <= bound, f"FastVideo {key}: d{'qkv'[j]} error {err:.3g} > bound {bound:.3g}"
    errors = fastvideo_errors([results[r][("tile planted", world, True)] for r in range(world)],
                              refs[("reference", fw.TILE_MODE_TILE, True)])
    assert any(err > 10 * bound for err, bound in errors), f"a gather summing over ranks passed: {errors}"


def spawn_parts(family: str, world: int, workdir) -> list:
    """This module's calls in the shared spawns (tests/world_spawns.py): the parallel steps of
    every group size at 3 ranks; FastVideo's backward at 2 (its strategy file written here)."""
    if (family, world) == ("diffusers", max(RANKS)):
        return [("parallel steps", tw.parallel_steps, ({ranks: parallel_runs(ranks) for ranks in RANKS},))]
    if (family, world) == ("fastvideo", 2):
        path = str(workdir / "training_mask_strategy.json")
        tw.fastvideo_strategy(path)
        return [("fastvideo grads", tw.fastvideo_grads, (path,))]
    return []
