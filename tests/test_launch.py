"""The main job end to end: the CLI on spawned gloo ranks, and a two-node launch (two
torchrun agents, c10d rendezvous on localhost) run to a verified summary."""

import os
import shutil
import subprocess
import sys

import pytest

from sta_dist.parallel.spawn import free_port

pytestmark = pytest.mark.timeout(400)

ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_ENV = {k: v for k, v in ENV.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
LAUNCH_ENV["PATH"] = os.path.dirname(sys.executable) + os.pathsep + ENV.get("PATH", "")  # this venv's sta-dist


@pytest.mark.parametrize("script, env, args, line", [
    ("torchrun.sh", dict(NGPU="0"), [], "launch/torchrun.sh: error: NGPU must be an int >= 1, got NGPU='0'"),
    ("torchrun.sh", dict(NGPU="1", CONFIG="nosuch"), ["--steps", "1"],
     "sta-dist run: error: config must be a JSON path or one of ['hunyuan_720p', 'stepvideo', 'tiny_cpu', "
     "'wan21_480p', 'wan21_720p'], got config='nosuch'"),
    ("slurm.sbatch", {}, [], "launch/slurm.sbatch: error: SLURM_JOB_NODELIST and SLURM_JOB_NUM_NODES must be set: "
                             "submit it with sbatch (e.g. sbatch --nodes 2 launch/slurm.sbatch)"),
    ("slurm.sbatch", dict(SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES="2", NGPU="x"), [],
     "launch/slurm.sbatch: error: NGPU must be an int >= 1, got NGPU='x'"),
])
def test_a_launch_misuse_is_one_line_and_exit_2(script, env, args, line):
    """Checked before torchrun or srun starts: no launcher traceback, torchrun's exit 1."""
    done = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, env=dict(LAUNCH_ENV, **env),
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.splitlines()) == (2, [line]), done.stdout + done.stderr


def test_sta_dist_run_default_is_verified():
    done = subprocess.run([sys.executable, "-m", "sta_dist.cli", "run", "--steps", "2"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "spawning 2 local rank(s)" in done.stdout
    assert "VERIFIED" in done.stdout and "modes per call" in done.stdout


def test_two_node_torchrun_rendezvous():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    port = free_port()
    cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test{port}", "--max-restarts", "0",
           "-m", "sta_dist.cli", "run", "--config", "tiny_cpu", "--steps", "2", "--layers", "2"]
    agents = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=300)[0])
    finally:
        for agent in agents:
            agent.kill()
    assert all(a.returncode == 0 for a in agents), "\n---\n".join(outputs)
    joined = "\n".join(outputs)
    assert "ranks=2 backend=gloo" in joined and "VERIFIED" in joined
