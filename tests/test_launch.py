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
