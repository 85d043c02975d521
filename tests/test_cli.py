"""The command line: every misuse is one line naming the argument, the rule and the value,
with a non-zero exit and no traceback; every packaged config plans and runs one step."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time

import pytest

from sta_dist import cli
from sta_dist.parallel.spawn import free_port
from sta_dist.resources import packaged
from sta_dist.run import packaged_configs

pytestmark = pytest.mark.timeout(300)

ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def one_line_error(capsys, argv, code=cli.USAGE_ERROR) -> str:
    """Run the CLI in this process; it must fail with ``code`` and one stderr line (a
    misuse and a failed job alike)."""
    try:
        got = cli.main(argv)
    except SystemExit as stop:  # argparse's own exit
        got = stop.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert got == code, (got, captured.out, captured.err)
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["run", "--config", "nosuch"], r"sta-dist run: error: config must be a JSON path or one of \['hunyuan_720p', "
                                    r".*\], got config='nosuch'"),
    (["plan", "--world-size", "0"], r"argument --world-size: must be an int >= 1, got '0'"),
    (["plan", "--layer", "999"], r"--layer must be in \[0, 60\) for config 'hunyuan_720p', got --layer 999"),
    (["plan", "--step", "7", "--config", "tiny_cpu"], r"--step must be in \[0, 3\) for config 'tiny_cpu', got --step 7"),
    (["plan", "--world-size", "1024", "--mode", "tile"], r"tile axis of 1024 ranks cannot split the tile grid "
                                                         r"\(5, 6, 10\)"),
    (["plan", "--mode", "tile", "--mesh", "2", "1"], r"mesh=\(P_head, P_tile\) is for mode='hybrid'"),
    (["plan", "--mode", "hybrid", "--world-size", "4", "--mesh", "3", "2"],
     r"mesh must be \(P_head, P_tile\) with P_head \* P_tile = world_size = 4, got mesh=\(3, 2\)"),
    (["run", "--steps", "0"], r"argument --steps: must be an int >= 1, got '0'"),
    (["run", "--steps", "-1"], r"argument --steps: must be an int >= 1, got '-1'"),
    (["run", "--layers", "0"], r"argument --layers: must be an int >= 1, got '0'"),
    (["run", "--layers", "9"], r"--layers must be in \[1, 4\] for config 'tiny_cpu', got --layers 9"),
    (["run", "--start-step", "99"], r"--start-step must be in \[0, 3\) for config 'tiny_cpu' \(3 steps\), "
                                    r"got --start-step 99"),
    (["run", "--start-step", "2", "--steps", "2"], r"--steps must be in \[1, 1\] .* got --steps 2"),
    (["run", "--timeout", "0"], r"argument --timeout: must be a number > 0, got '0'"),
    (["run", "--canvas", "4", "4"], r"argument --canvas: expected 3 arguments"),
    (["run", "--mode", "ring"], r"argument --mode: invalid choice: 'ring'"),
    (["run", "--config", "hunyuan_720p", "--steps", "1"],
     r"config 'hunyuan_720p' is GPU-sized for this CPU: about \d+ s .* over --timeout 600; shrink it"),
    (["bench", "kernel"], r"sta-dist bench kernel needs a CUDA GPU, and none is visible"),
    (["bench", "dist"], r"sta-dist bench dist must run under torchrun"),
    (["nosuch"], r"argument command: invalid choice: 'nosuch'"),
])
def test_misuse_is_one_line(capsys, monkeypatch, argv, message):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert re.search(message, one_line_error(capsys, argv))


@pytest.mark.parametrize("content, message", [
    ("{not json", r"config '.*bad.json' is not valid JSON: Expecting property name"),
    ('{"name": "x", "canvas": [4, 4, 4]}', r"config '.*bad.json' is missing required fields \['head_dim', "
                                           r"'heads', 'kv_heads', 'layers', 'mask_strategy', 'steps', 'tile'\]"),
    ('{"name": "x", "colour": 1}', r"has unknown fields \['colour'\]"),
    ('[1, 2]', r"must be a JSON object of fields, got list"),
])
def test_bad_config_files(capsys, tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert re.search(message, one_line_error(capsys, ["run", "--config", str(path)]))


@pytest.mark.parametrize("argv", [["--debug", "run", "--config", "nosuch"], ["run", "--debug", "--config", "nosuch"],
                                  ["run", "--config", "nosuch", "--debug"]])
def test_debug_shows_the_traceback_before_or_after_the_subcommand(argv):
    with pytest.raises(ValueError, match="config must be a JSON path"):
        cli.main(argv)


@pytest.mark.parametrize("argv, line", [
    (["run", "--bogus"], "sta-dist run: error: unrecognized arguments: --bogus (see sta-dist run --help)"),
    (["plan", "--ranks", "x"], "sta-dist plan: error: unrecognized arguments: x (see sta-dist plan --help)"),
    (["bench", "kernel", "--bogus"],
     "sta-dist bench kernel: error: unrecognized arguments: --bogus (see sta-dist bench kernel --help)"),
])
def test_unrecognized_arguments_name_the_subcommands_help(capsys, argv, line):
    assert one_line_error(capsys, argv) == line


def test_a_launch_environment_that_cannot_form_the_job_is_a_misuse(capsys, monkeypatch):
    """A RANK outside WORLD_SIZE: one line, exit 2, no hint of a traceback (item 1 of issue 31)."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert one_line_error(capsys, ["run", "--steps", "1"]) == (
        "sta-dist run: error: RANK must be in [0, WORLD_SIZE=2), got RANK=3: each of the 2 ranks needs its own "
        "RANK below WORLD_SIZE")


def test_check_starts_nothing(capsys):
    assert cli.main(["run", "--check", "--steps", "2", "--layers", "1"]) == 0
    assert capsys.readouterr().out == ("sta-dist run --check: config tiny_cpu, 2 step(s) from step 0, 1 layer(s): "
                                       "the arguments check out; nothing started\n")


def test_help_is_plain_text_and_names_every_subcommand(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "``" not in out
    assert ("sta-dist: run (the main job: a workload, distributed and verified), plan, doctor, bench,\n"
            "generate (a video with a diffusers pipeline).\n") in out
    assert "{run,plan,doctor,bench,generate}" in out


def test_generate_without_diffusers_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed: import raises ImportError
    assert cli.main(["generate", "--pipeline", "tiny", "--prompt", "x", "--out", "v.gif"]) == cli.USAGE_ERROR
    assert capsys.readouterr().err == (
        "sta-dist generate: error: sta-dist generate needs diffusers, which does not import here (import of "
        "diffusers halted; None in sys.modules): install the diffusers extra with pip install -e '.[diffusers]'\n")


def test_fastvideo_skip_names_an_extra_that_exists(monkeypatch):
    import importlib.util
    import tomllib

    from tests.fastvideo_support import skip_without_fastvideo

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(pytest.skip.Exception) as skipped:
        skip_without_fastvideo()
    assert str(skipped.value.msg) == ("fastvideo is not installed: pip install -e '.[fastvideo-test]' && pip install "
                                      "--no-deps fastvideo==0.1.7 (as the README says)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        assert "fastvideo-test" in tomllib.load(f)["project"]["optional-dependencies"]


def test_version_and_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "sta_dist", "--version"], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("sta-dist 0."), done.stdout + done.stderr


@pytest.mark.parametrize("config", packaged_configs())
def test_every_packaged_config_plans(capsys, config):
    assert cli.main(["plan", "--config", config, "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"config {config}:" in out and "rank 3:" in out


def model_line(out: str, mode: str, mesh: str) -> str:
    """The model's figures of one candidate plan in ``sta-dist plan``'s output."""
    line = next(line for line in out.splitlines() if re.match(rf"^ [* ] mode {mode} +mesh {re.escape(mesh)} ", line))
    return re.search(r"predicted +[\d.]+ ms, at most +[\d.]+ MB sent per rank", line).group(0)


def test_plan_stays_readable_at_1024_ranks_and_warns_of_idle_ranks(capsys):
    """The idle warning's figures are the model's lines' own (ms and MB sent per rank);
    a mesh chosen by cost gives its figures' unit, the tile-head, in MB."""
    assert cli.main(["plan", "--world-size", "64", "--mode", "head"]) == 0
    out = capsys.readouterr().out
    better, this = model_line(out, "hybrid", "(8, 8)"), model_line(out, "head", "(64, 1)")
    assert re.sub(r" +", " ", better) == "predicted 1.76 ms, at most 185.5 MB sent per rank"
    assert ("WARNING: 40 of 64 ranks compute no head in this call (ranks 24, 25, 26, 27, 28, 29, 30, 31 ... (40 in "
            "all)); --mode hybrid --mesh 8 8 would use them (predicted 1.76 ms, at most 185.5 MB sent per rank; "
            "this plan: predicted 2.60 ms, at most 67.0 MB sent per rank)") in out.splitlines()
    assert re.sub(r" +", " ", this) == "predicted 2.60 ms, at most 67.0 MB sent per rank"
    assert len(out.splitlines()) < 25 and "* mode head   mesh (64, 1)" in out  # the chosen plan among candidates
    assert cli.main(["plan", "--world-size", "1024"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 15 and "(one line per rank: --ranks)" in out
    assert cli.main(["plan", "--world-size", "3", "--mode", "hybrid"]) == 0  # hybrid picks its own mesh
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("(hybrid: mesh (3, 1) by cost: 2400 tile-heads of work and 6400 moved per rank)")
    assert lines[2] == ("  (the mesh's figures are tile-heads, for the plan's hinted windows: one tile-head is 0.098 MB, "
                        "a tile of q, k, v or o for one head; the model's MB sent per rank below are this call's)")


FALLBACK_LINE = ("head (fallback): from the box of every rank the windows [(1, 6, 10), (5, 1, 10), (5, 6, 1)] reach "
                 "all 300 tiles of grid (5, 6, 10), so the halo would be the whole canvas; the cost model prices head "
                 "mode lower than tile mode with that halo")


def test_plan_and_doctor_say_why_a_call_falls_back_to_head_mode(capsys):
    assert cli.main(["plan", "--world-size", "4", "--mode", "hybrid"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index("4 ranks, this call in mode head (fallback):") - 1] == FALLBACK_LINE
    assert cli.main(["doctor", "--world-size", "4", "--mode", "hybrid"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "  " + FALLBACK_LINE and lines[3].startswith("  every rank: head (fallback): video: torch (")


def test_plan_shows_the_wide_heads_in_tile_mode(capsys):
    """The real strategy's sparse layer 0 on a 2-rank tile plan: its heads whose windows span
    the canvas stay in tile mode (the model prices their halo, the other rank's half, as
    exchanged beside the box's own keys), and the report shows that halo and the model."""
    assert cli.main(["plan", "--config", "hunyuan_720p", "--world-size", "2", "--mode", "tile", "--step", "16"]) == 0
    out = capsys.readouterr().out
    assert "2 ranks, this call in mode tile:" in out and "this call in 2 parts" not in out
    assert "halo tokens received   min    57600  max    57600" in out  # the other half of 115,200
    tile, head = (float(line.split("predicted")[1].split("ms")[0]) for line in out.splitlines()
                  if line.lstrip(" *").startswith(("mode tile", "mode head")))
    assert tile < head
    assert "rank 1:" in out and "mode tile, 24 heads" in out


SHRUNK = {"tiny_cpu": [], "hunyuan_720p": ["--canvas", "6", "16", "16", "--heads", "4"],
          "wan21_480p": ["--canvas", "6", "10", "20", "--heads", "4"],
          "wan21_720p": ["--canvas", "6", "16", "16", "--heads", "4"],
          "stepvideo": ["--canvas", "6", "16", "16", "--heads", "4"]}


@pytest.mark.parametrize("config", packaged_configs())
def test_every_packaged_config_runs_one_step(capfd, config):
    code = cli.main(["run", "--config", config, "--steps", "1", "--layers", "2", *SHRUNK[config]])
    out = capfd.readouterr().out
    assert code == 0, out
    assert "VERIFIED" in out and f"config={config}" in out


def test_progress_suits_a_log_file(capfd, tmp_path):
    assert cli.main(["run", "--steps", "2", "--layers", "2", "--summary", str(tmp_path / "s.json")]) == 0
    out = capfd.readouterr().out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["verified"] and len(summary["step_ms"]) == 2
    assert "\r" not in out
    progress = [line for line in out.splitlines() if line.startswith("progress")]
    assert len(progress) == 2 and all(len(line) < 120 for line in progress), progress


def launch(env_overrides, timeout=60):
    env = dict(ENV, **env_overrides)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sta_dist", "run", "--steps", "1"], env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done, time.monotonic() - start


RENDEZVOUS = pytest.mark.xdist_group("cli-rendezvous")  # the launches that wait: one worker starts both


@pytest.fixture(scope="module")
def rendezvous_launches():
    """The two launches that wait out the 15 s rendezvous, started together (each a process of
    its own, timed from its own start to its own exit): RANK -> a function giving
    ``(finished process, seconds)``."""
    import threading

    results, threads = {}, {}
    for rank in ("0", "1"):
        env = dict(RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        threads[rank] = threading.Thread(target=lambda rank=rank, env=env: results.__setitem__(rank, launch(env)))
        threads[rank].start()

    def finished(rank):
        threads[rank].join()
        return results[rank]

    yield finished
    for thread in threads.values():
        thread.join()


@pytest.mark.parametrize("overrides, message", [
    (dict(RANK="3", WORLD_SIZE="2"), r"RANK must be in \[0, WORLD_SIZE=2\), got RANK=3"),
    pytest.param(dict(RANK="0", WORLD_SIZE="2"), r"rank 0 of 2 could not form the job at 127\.0\.0\.1:\d+ within 15 s: "
                 r"only some of the 2 ranks joined: start WORLD_SIZE=2 processes", marks=RENDEZVOUS),
    pytest.param(dict(RANK="1", WORLD_SIZE="2"), r"rank 1 of 2 could not form the job .* rank 0 did not answer at ",
                 marks=RENDEZVOUS),
    (dict(RANK="x", WORLD_SIZE="2"), r"RANK must be an int, got RANK='x'"),
])
def test_wrong_environment_fails_within_30_s(request, monkeypatch, capfd, overrides, message):
    """A launch environment that cannot form the job: exit 2 and one line within 30 s. Those
    that meet no peer run ``python -m sta_dist`` in a process of their own (two together: they
    wait out the rendezvous); the ones refused before any rendezvous (a RANK outside
    WORLD_SIZE, or not an int) run ``cli.main`` in this process."""
    if overrides["RANK"] in ("0", "1"):
        done, seconds = request.getfixturevalue("rendezvous_launches")(overrides["RANK"])
        code, stderr = done.returncode, done.stderr
    else:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_USE_AGENT_STORE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in dict(overrides, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
            monkeypatch.setenv(name, value)
        start = time.monotonic()
        code = cli.main(["run", "--steps", "1"])
        seconds, stderr = time.monotonic() - start, capfd.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == cli.USAGE_ERROR and seconds < 30, (seconds, stderr)
    assert len(lines) == 1 and lines[0].startswith("sta-dist run: error: "), stderr
    assert re.search(message, lines[0]), stderr


def test_a_spawned_job_past_its_deadline_says_what_to_do(capsys):
    line = one_line_error(capsys, ["run", "--timeout", "0.5", "--steps", "1", "--layers", "1"], code=cli.JOB_FAILED)
    assert line.startswith("sta-dist run: error: SpawnError: ")
    assert "did not finish within 0.5s (--timeout 0.5): give it more time with --timeout" in line
    assert line.endswith(" (run again with --debug for the traceback: sta-dist run --debug ...)")


def test_a_config_given_by_path(capsys, tmp_path):
    """A config file given by path works like a packaged one."""
    path = tmp_path / "mine.json"
    spec = json.loads(open(packaged("tiny_cpu.json")).read())
    spec["mask_strategy"] = "uniform:1,2,2"
    path.write_text(json.dumps(spec))
    assert cli.main(["plan", "--config", str(path), "--world-size", "2"]) == 0
    assert "windows at step 2, layer 0: [(1, 2, 2)]" in capsys.readouterr().out


def test_doctor_prints_each_ranks_route_as_the_route_gives_it(capsys, tmp_path):
    """``sta-dist doctor`` shows, per rank, the route :func:`sta_dist.route.route` gives the
    rank's local call as it runs (the cost model's parts; here as on an H100), and refuses
    a kernel that cannot take it."""
    from sta_dist.dispatch import layout_call
    from sta_dist.local import LocalText
    from sta_dist.parallel.decide import call_parts
    from sta_dist.parallel.plan import ShardPlan
    from sta_dist.route import Device, route
    from sta_dist.run import RunConfig

    assert cli.main(["doctor", "--assume-gpu", "h100", "--world-size", "2", "--mode", "tile", "--step", "49"]) == 0
    printed = capsys.readouterr().out
    cfg = RunConfig.load("hunyuan_720p", mode="tile")
    strategy = cfg.strategy()
    plan = ShardPlan.from_config(cfg, 2, strategy=strategy)
    windows = tuple(strategy.layer_windows(49, 0)[h % 24] for h in range(cfg.heads))
    parts = call_parts(plan, windows, cfg.kv_heads, cfg.batch, cfg.head_dim, 2, cfg.text_valid)  # bf16
    assert len(parts) == 1
    for rank in range(2):
        sched = parts[0].schedule(plan, rank)  # the schedule the call runs: wide heads in tile mode, as plan says
        text = LocalText.per_sample(cfg.text_valid, kv_for_text_q=sched.counts_text_keys)
        merge = len(sched.tile_group) > 1 and cfg.text_valid > 0
        expected = route(layout_call(sched.layout, sched.heads, text, cfg.dtype, cfg.head_dim, merge), Device.hopper())
        assert sched.mode == "tile" and f"  rank {rank}: tile: {expected.describe()}" in printed.splitlines()
    path = tmp_path / "tile3.json"  # 3x8x8 tiles: 192 rows, no 128-row blocks
    spec = json.loads(open(packaged("hunyuan_720p.json")).read())
    path.write_text(json.dumps(dict(spec, tile=[3, 8, 8])))
    assert cli.main(["doctor", "--assume-gpu", "h100", "--backend", "cuda", "--config", str(path)]) == 0
    assert "refused: backend='cuda' cannot run this call: the cuda kernel reads blocks of 128 rows: tile=(3, 8, 8)" \
        in capsys.readouterr().out
