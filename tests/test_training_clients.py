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

from sta_dist.parallel.spawn import spawn_local  # noqa: E402
from sta_dist.testing import error_bound, max_error  # noqa: E402
from tests import training_workers as tw  # noqa: E402

pytestmark = pytest.mark.timeout(400)
MODELS = ("wan", "hunyuan")


def flat(tensors: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for _, t in sorted(tensors.items())])


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


def parallel_runs(world: int) -> list:
    runs = [(name, mode, False, None) for name in MODELS for mode in ("tile", "head")]
    runs += [(name, "tile", True, None) for name in MODELS]
    if world == 2:
        runs += [("wan", "tile", False, "gather sums"), ("hunyuan", "tile", False, "text whole")]
    return runs


@pytest.mark.parametrize("world", [1, 2, 3])
def test_parallel_step_equals_one_process(world, references):
    runs = parallel_runs(world)
    results = spawn_local(tw.parallel_steps, world, (runs,), timeout_s=360)
    for i, (name, mode, checkpoint, planted) in enumerate(runs):
        what = f"{name} parallel={mode!r} on {world} ranks" + (", checkpointed" if checkpoint else "")
        ranks = [results[r][i] for r in range(world)]
        for r, result in enumerate(ranks):  # the ranks take the same step
            for key in ("grads", "params"):
                assert all(torch.equal(result[key][n], ranks[0][key][n]) for n in result[key]), (what, r, key)
        if planted is None:
            check_step(ranks[0], *references[name], what)
        else:
            errors = step_errors(ranks[0], *references[name])
            assert errors["grads"][0] > 10 * errors["grads"][1], f"{what} with {planted!r} planted passed: {errors}"
