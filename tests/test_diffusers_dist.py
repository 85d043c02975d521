"""The whole transformer sequence-parallel on gloo ranks: with sta_dist's ``parallel=``
(head, tile, auto, hybrid) and under diffusers' own ``enable_parallelism`` (Ulysses);
every rank's output equals the one-process output (both within the float32 bound of the
float64 reference of diffusers' own attention under the STA mask).

The ranks are the diffusers family's shared spawns (tests/world_spawns.py: one per world
size, beside the selection and training tests; diffusers' own context parallelism last)."""

import pytest
import torch

pytest.importorskip("diffusers")

import sta_dist.diffusers as sta_diffusers  # noqa: E402
from tests import diffusers_models as dm  # noqa: E402
from tests import diffusers_workers as workers  # noqa: E402
from tests.world_spawns import shares, world_param  # noqa: E402

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


def sta_runs(world: int) -> list:
    modes = ["head", "tile", "auto"] + (["hybrid"] if world == 2 else [])
    return [(name, mode) for name in ("wan", "hunyuan") for mode in modes]


@pytest.mark.parametrize("world", [world_param("diffusers", w) for w in (2, 3)])
def test_sta_parallel_equals_one_process(world, world_spawn):
    runs = sta_runs(world)
    results = world_spawn("diffusers", world, "test_diffusers_dist:sta parallel")
    for i, (name, mode) in enumerate(runs):
        check_ranks([results[r][i][0] for r in range(world)], name, mode)
        if mode in ("head", "tile"):
            assert {results[r][i][1] for r in range(world)} == {mode}
            exchange = "halo exchange" if mode == "tile" else "head all-to-all"
            for step in (exchange, "output gather"):
                assert sum(results[r][i][2].get(step, 0) for r in range(world)) > 0, step


ULYSSES = [(name, sta_first) for sta_first in (True, False) for name in ("wan", "hunyuan")]


@pytest.mark.parametrize("sta_first", [True, False], ids=["sta-then-diffusers", "diffusers-then-sta"])
@shares("diffusers", 2)
def test_under_diffusers_ulysses(sta_first, world_spawn):
    for name in ("wan", "hunyuan"):
        results = world_spawn("diffusers", 2, f"test_diffusers_dist:ulysses {name} sta first={sta_first}")
        check_ranks([out for out, _ in results], name, "diffusers Ulysses")
        assert results[0][1]["head all-to-all"] > 0  # sta_dist's head mode did the exchange


@shares("diffusers", 2)
def test_diffusers_ring_is_refused(world_spawn):
    messages = world_spawn("diffusers", 2, "test_diffusers_dist:ring refused")
    for message in messages:
        assert "ring attention is not supported, got ContextParallelConfig(ring_degree=2, ulysses_degree=1)" in message


def spawn_parts(family: str, world: int, workdir) -> list:
    """This module's calls in the diffusers family's shared spawn (tests/world_spawns.py);
    diffusers' own context parallelism last (it patches torch.accelerator.device_count)."""
    if family != "diffusers":
        return []
    parts = []
    if world in (2, 3):  # test_sta_parallel_equals_one_process
        parts.append(("sta parallel", workers.sta_parallel, (sta_runs(world),)))
    if world == 2:  # test_under_diffusers_ulysses, test_diffusers_ring_is_refused
        parts += [(f"ulysses {name} sta first={sta_first}", workers.diffusers_ulysses, (name, sta_first))
                  for name, sta_first in ULYSSES]
        parts.append(("ring refused", workers.diffusers_ring_refused, ()))
    return parts
