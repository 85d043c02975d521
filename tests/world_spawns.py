"""Process groups shared by the tests of several modules: one spawn per family and world size.

Starting a gloo rank costs more than most of the calls a test makes in it (the interpreter,
torch and, for the diffusers and FastVideo families, those libraries' imports: seconds of
CPU per rank), so the tests that need ranks of one kind at one world size share one spawn.
Each test module of a family lists its *parts* for a world size (``spawn_parts(family,
world, workdir)``: ``(name, fn, args)``, ``fn(rank, world, *args)`` importable by spawn, as
for ``spawn_local``); the first test that asks for a part (:func:`part`) spawns the world's
ranks once, and they run every part of every module of the family in turn. Each part's
result is kept apart (a file per part and rank): a part that fails on some rank fails only
the tests that read it, with that part's name and the ranks' errors; a spawn past its
deadline fails only the parts it did not finish.

A test that reads a shared spawn carries its ``xdist_group`` mark (:func:`on_world`), so that
pytest-xdist (``--dist loadgroup``, set in pyproject.toml; tests/conftest.py mends the
group suffix of the node ids under pytest 9.2) runs the tests of one spawn in one worker
process, where the spawn's results are kept. Without it (or without xdist) every result
is the same; a worker just may start its own copy of a spawn.

Every spawn has a free port and a deadline (``spawn_local``); the collectives' own timeout is
shorter than the deadline, so a rank left waiting by a part that failed on another rank gets
its error and the later parts still run.
"""

from __future__ import annotations

import importlib
import io
import os
import traceback
from pathlib import Path

import pytest
import torch

FAMILIES = {
    # sta_dist alone (no diffusers or FastVideo import in its ranks)
    "gloo": ("tests.test_distributed", "tests.test_distributed_backward", "tests.test_selection_dist",
             "tests.test_text_lengths"),
    # tiny diffusers transformers: sta_dist's parallel=, training, and (last) diffusers' own
    # context parallelism, which patches torch.accelerator.device_count in its ranks
    "diffusers": ("tests.test_diffusers_selection", "tests.test_training_clients", "tests.test_diffusers_dist"),
    # FastVideo 0.1.7's own layers and parallel state (its import: ~10 s a rank)
    "fastvideo": ("tests.test_fastvideo", "tests.test_training_clients"),
}
DEADLINE_S = {"gloo": 400, "diffusers": 400, "fastvideo": 400}
"""Each family's spawn deadline (every part of a world size, on a loaded 2-core CI machine);
the tests that read a shared spawn have a pytest timeout above it (:data:`TEST_TIMEOUT_S`)."""
COLLECTIVE_TIMEOUT_S = 120
TEST_TIMEOUT_S = 560


def on_world(family: str, world: int):
    """The mark of a test that reads the spawn of ``family`` at ``world`` ranks: one xdist
    group per spawn, and a pytest timeout that covers the spawn's deadline."""
    return [pytest.mark.xdist_group(f"{family}-{world}"), pytest.mark.timeout(TEST_TIMEOUT_S)]


def shares(family: str, world: int):
    """Decorator: :func:`on_world`'s marks on a test of one world size."""
    def mark(test):
        for m in on_world(family, world):
            test = m(test)
        return test
    return mark


def world_param(family: str, world: int, *values, id: str | None = None):
    """A ``pytest.param`` of ``world`` (then ``values``) with :func:`on_world`'s marks."""
    return pytest.param(world, *values, marks=on_world(family, world), id=id)


def run_parts(rank: int, world: int, parts: list, out_dir: str) -> int:
    """On every rank: each part in turn, its result (or its error) saved to its own file;
    threads and the current directory as they were before each part."""
    threads, cwd = torch.get_num_threads(), os.getcwd()
    for i, (name, fn, args) in enumerate(parts):
        try:
            outcome = ("ok", fn(rank, world, *args))
        except BaseException as err:  # noqa: BLE001 - reported to the test that reads this part
            outcome = ("error", f"{type(err).__name__}: {err}", traceback.format_exc())
        finally:
            torch.set_num_threads(threads)
            os.chdir(cwd)
        buffer = io.BytesIO()
        torch.save(outcome, buffer)
        tmp = os.path.join(out_dir, f"{i}.{rank}.tmp")
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, os.path.join(out_dir, f"{i}.{rank}"))  # complete, or absent
    return len(parts)


_spawned: dict[tuple[str, int], tuple[list, dict, str]] = {}


def _spawn(family: str, world: int, base: Path) -> tuple[list, dict, str]:
    """Every part of ``family`` at ``world`` ranks, run in one spawn: the part names, their
    outcomes per rank (``{(part, rank): outcome}``) and the spawn's own error ("" if none)."""
    from sta_dist.parallel.spawn import SpawnError, spawn_local

    workdir = base / f"{family}-{world}"
    out_dir = workdir / "parts"
    out_dir.mkdir(parents=True)
    parts = []
    for module in FAMILIES[family]:
        for name, fn, args in importlib.import_module(module).spawn_parts(family, world, workdir):
            parts.append((f"{module.removeprefix('tests.')}:{name}", fn, tuple(args)))
    if not parts:
        raise ValueError(f"no part of family {family!r} runs at world size {world}")
    error = ""
    try:
        for r, returned in enumerate(spawn_local(run_parts, world, (parts, str(out_dir)), timeout_s=DEADLINE_S[family],
                                                 collective_timeout_s=COLLECTIVE_TIMEOUT_S, allow_failures=True)):
            if returned != len(parts):
                error += f"rank {r} failed: {returned.splitlines()[0]}\n"
    except SpawnError as err:  # past the deadline: the parts that finished are kept
        error = str(err)
    outcomes = {}
    for i, (name, _, _) in enumerate(parts):
        for r in range(world):
            path = out_dir / f"{i}.{r}"
            if path.exists():
                outcomes[(name, r)] = torch.load(io.BytesIO(path.read_bytes()), weights_only=False)
    return [name for name, _, _ in parts], outcomes, error.strip()


def outcomes(family: str, world: int, name: str, base: Path) -> list:
    """Part ``name`` (``module:part``) of the shared spawn: per rank its result, or the
    text of its error (``"Type: message\\ntraceback"``, as ``spawn_local(...,
    allow_failures=True)`` gives it). Raises where a rank did not finish the part."""
    from sta_dist.parallel.spawn import SpawnError

    key = (family, world)
    if key not in _spawned:
        _spawned[key] = _spawn(family, world, base)
    names, got, error = _spawned[key]
    if name not in names:
        raise KeyError(f"no part {name!r} in the {family} spawn of {world} ranks (its parts: {names})")
    missing = [r for r in range(world) if (name, r) not in got]
    if missing:
        raise SpawnError(f"part {name!r} of the {family} spawn of {world} ranks did not finish on ranks {missing}: "
                         f"{error or 'no error reported'}")
    return [got[(name, r)][1] if got[(name, r)][0] == "ok" else f"{got[(name, r)][1]}\n{got[(name, r)][2]}"
            for r in range(world)]


def part(family: str, world: int, name: str, base: Path) -> list:
    """Part ``name`` of the shared spawn: each rank's result (rank order), as ``spawn_local``
    returns them; raises naming the part and each failing rank's error."""
    from sta_dist.parallel.spawn import SpawnError

    key = (family, world)
    results = outcomes(family, world, name, base)
    _, got, _ = _spawned[key]
    failed = {r: got[(name, r)] for r in range(world) if got[(name, r)][0] != "ok"}
    if failed:
        raise SpawnError("\n".join(f"part {name!r} of the {family} spawn of {world} ranks: rank {r} failed: {o[1]}"
                                   for r, o in sorted(failed.items())),
                         "\n".join(f"rank {r}: {o[2]}" for r, o in sorted(failed.items())))
    return results


class WorldSpawn:
    """What the session fixture ``world_spawn`` gives a test: the shared spawns' parts."""

    def __init__(self, base: Path):
        self.base = base

    def __call__(self, family: str, world: int, name: str) -> list:
        return part(family, world, name, self.base)

    def outcomes(self, family: str, world: int, name: str) -> list:
        return outcomes(family, world, name, self.base)

    def workdir(self, family: str, world: int) -> Path:
        """The folder the parts of that spawn were given (``spawn_parts``' ``workdir``)."""
        return self.base / f"{family}-{world}"
