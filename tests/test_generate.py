"""``sta-dist generate --pipeline tiny``: a fresh clone without a GPU or weights writes a
video and its summary (the console entry point in a process of its own); misuse prints one
line and exits non-zero (``cli.main`` in this process: no interpreter, torch and diffusers
start-up per message)."""

import io
import json
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sta_dist.generate import StepProgress  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def generate(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sta_dist.cli", "generate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=280)


def test_tiny_pipeline_writes_video_and_summary(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "out" / "video.mp4"
    result = generate("--pipeline", "tiny", "--prompt", "a cat walks on the beach", "--steps", "3",
                      "--tile", "1", "2", "2", "--window", "2", "1", "1", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (f"wrote the video to {out} and its summary to "
                                              f"{out.with_suffix('.json')}")
    assert out.stat().st_size > 0 and out.read_bytes()[4:8] == b"ftyp"  # an MP4 container
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["model"] == "WanTransformer3DModel" and summary["steps"] == 3 and summary["frames"] == 9
    assert len(summary["step_seconds"]) == 3 and 0 < summary["attention_share"] <= 1
    assert summary["mode"] == "one process" and summary["window"] == [2, 1, 1]
    steps = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/3", "2/3", "3/3"]  # a log file gets one line per step


@pytest.mark.parametrize("args, message", [
    (["--pipeline", "/no/such/folder", "--prompt", "x"], "--pipeline must be 'tiny' or a local diffusers pipeline folder"),
    (["--pipeline", "tiny", "--prompt", "x", "--window", "1", "1", "1", "--mask-strategy", "hunyuan"],
     "give --window or --mask-strategy, not both"),
    (["--pipeline", "tiny", "--prompt", "x", "--out", "video.txt"], "--out must name a video file"),
    (["--pipeline", "tiny", "--prompt", "x", "--tile", "0", "2", "2", "--out", "v.gif"],
     r"tile entries must all be >= 1, got tile=(0, 2, 2)"),
])
def test_misuse_is_one_line(tmp_path, monkeypatch, capfd, args, message):
    from sta_dist import cli

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):  # one process, as run by hand
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    import torch

    with torch.random.fork_rng(devices=[]):  # the tiny pipeline seeds torch's global generator
        code = cli.main(["generate", *args])
    stderr = capfd.readouterr().err
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("sta-dist generate: error:")]
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr


def test_progress_redraws_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        progress = StepProgress(2, stream)
        progress.update(1, 0.5, 0.5)
        progress.update(2, 0.5, 1.0)
    assert tty.getvalue().count("\r") == 2 and tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1
    assert log.getvalue().count("\n") == 2 and "\r" not in log.getvalue()
