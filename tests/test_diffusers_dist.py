"""The whole transformer sequence-parallel on gloo ranks: with sta_dist's ``parallel=``
(head, tile, auto, hybrid) and under diffusers' own ``enable_parallelism`` (Ulysses);
every rank's output equals the one-process output (both within the float32 bound of the
float64 reference of diffusers' own attention under the STA mask)."""

import pytest
import torch

pytest.importorskip("diffusers")

import sta_dist.diffusers as sta_diffusers  # noqa: E402
from sta_dist.parallel.spawn import spawn_local  # noqa: E402
from tests import diffusers_models as dm  # noqa: E402
from tests import diffusers_workers as workers  # noqa: E402

pytestmark = pytest.mark.timeout(400)


def one_process(name: str):
    """The one-process sta_dist output and its float64 / float32 references."""
    model, kw = workers.build(name)
    layer_windows = [workers.WINDOWS] * len(dm.attention_modules(model))
    ref = dm.masked_reference(model, kw, layer_windows, workers.TEXT_VALID, canvas=workers.CANVAS)
    base = dm.masked_reference(model, kw, layer_windows, workers.TEXT_VALID, torch.float32, workers.CANVAS)
    sta_diffusers.enable(model, tile=dm.TILE, window=workers.WINDOWS)
    return dm.run(model, kw), ref, base


def check_ranks(outs, name: str, what: str) -> None:
    one, ref, base = one_process(name)
    dm.check(one, ref, base, f"{name} one process")
    for rank, out in enumerate(outs):
        dm.check(out, ref, base, f"{name} {what} rank {rank}")
        assert torch.equal(out, outs[0])  # every rank holds the same gathered output


@pytest.mark.parametrize("world", [2, 3])
def test_sta_parallel_equals_one_process(world):
    modes = ["head", "tile", "auto"] + (["hybrid"] if world == 2 else [])
    runs = [(name, mode) for name in ("wan", "hunyuan") for mode in modes]
    results = spawn_local(workers.sta_parallel, world, (runs,), timeout_s=360)
    for i, (name, mode) in enumerate(runs):
        check_ranks([results[r][i][0] for r in range(world)], name, mode)
        if mode in ("head", "tile"):
            assert {results[r][i][1] for r in range(world)} == {mode}
            exchange = "halo exchange" if mode == "tile" else "head all-to-all"
            for step in (exchange, "output gather"):
                assert sum(results[r][i][2].get(step, 0) for r in range(world)) > 0, step


@pytest.mark.parametrize("sta_first", [True, False], ids=["sta-then-diffusers", "diffusers-then-sta"])
def test_under_diffusers_ulysses(sta_first):
    for name in ("wan", "hunyuan"):
        results = spawn_local(workers.diffusers_ulysses, 2, (name, sta_first), timeout_s=240)
        check_ranks([out for out, _ in results], name, "diffusers Ulysses")
        assert results[0][1]["head all-to-all"] > 0  # sta_dist's head mode did the exchange


def test_diffusers_ring_is_refused():
    messages = spawn_local(workers.diffusers_ring_refused, 2, timeout_s=120)
    for message in messages:
        assert "ring attention is not supported, got ContextParallelConfig(ring_degree=2, ulysses_degree=1)" in message
