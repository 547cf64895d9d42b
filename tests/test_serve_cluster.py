"""`scc serve --address`: deploy onto a Ray cluster that someone else started (here: `ray start --head` on
127.0.0.1, started by the test and stopped by the PIDs of its processes, never `ray stop`, which would stop every
Ray of this user on the machine), then classify through the cluster's Serve proxy; a second deployment that asks
for other HTTP options than the running Serve has is refused. Slow: a second Ray start."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from scc.serve.client import Client, wait_ready
from scc.serve.loopback import local_ray_env
from scc.serve.process import alive, cmdline, descendants, free_port

from test_serve import png_bytes

pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[serve]')")

pytestmark = pytest.mark.serve


def cluster_pids(temp_dir: str) -> list[int]:
    """Every process of the cluster whose session lives under temp_dir (GCS, raylet, log monitor... name it on their
    command lines), and every process below them (workers rename themselves ray::...)."""
    roots = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and temp_dir in cmdline(int(d.name))]
    return sorted({*roots, *(c for r in roots for c in descendants(r))})


@pytest.mark.slow  # a `ray start --head` of its own, a deployment and a teardown: ~1-2 min on 2 cores
def test_deploy_onto_an_existing_cluster(digits, tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = tempfile.mkdtemp(prefix="scc-ray-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {**os.environ, **local_ray_env(), "RAY_worker_niceness": "0", "OMP_NUM_THREADS": "1"}
    gcs, http_port = free_port(), free_port()
    started = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                              "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert cluster_pids(temp_dir)
        deploy = subprocess.run([sys.executable, "-m", "scc.cli", "serve", "--address", f"127.0.0.1:{gcs}",
                                 "--host", "127.0.0.1", "--port", str(http_port), "--defense", "scc",
                                 "--max-batch", "2", "--max-queue", "16", "--max-images", "8"],
                                env=env, capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
        assert "deployed onto" in deploy.stdout
        url = f"http://127.0.0.1:{http_port}"
        wait_ready(url, timeout=240)
        png = png_bytes(digits[0][0])
        c = Client(url, timeout=60)
        try:
            answers = [json.loads(c.request("POST", "/v1/classify?key=7&top_k=10", png,
                                            {"Content-Type": "image/png"})[1]) for _ in range(2)]
            info = json.loads(c.request("GET", "/v1/info")[1])
        finally:
            c.close()
        assert [a["draws"] for a in answers] == ["fresh", "fresh"] and info["draws"] == "fresh"
        # the default mode: the same image and key, two requests, two independent sets of draws
        assert answers[0]["results"][0]["scores"] != answers[1]["results"][0]["scores"]
        assert answers[0]["results"][0]["key"] == 7
        # Serve already runs there with its own options: a deployment asking for another port (and HTTPS) is
        # refused in one line naming each difference, and nothing is deployed over the running application
        other = subprocess.run([sys.executable, "-m", "scc.cli", "serve", "--address", f"127.0.0.1:{gcs}",
                                "--host", "127.0.0.1", "--port", str(free_port()), "--defense", "none",
                                "--max-batch", "2", "--max-queue", "16", "--max-images", "8"],
                               env=env, capture_output=True, text=True, timeout=300)
        assert other.returncode == 2, other.stdout[-2000:] + other.stderr[-2000:]
        lines = [line for line in other.stderr.splitlines() if line.startswith("scc")]
        assert len(lines) == 1 and "HTTP port" in lines[0] and "nothing was deployed" in lines[0], other.stderr
        c = Client(url, timeout=60)
        try:
            again = json.loads(c.request("POST", "/v1/classify?key=7&top_k=10", png, {"Content-Type": "image/png"})[1])
        finally:
            c.close()
        assert again["spec"] == "scc"  # still the first deployment
    finally:
        pids = cluster_pids(temp_dir)
        for p in pids:
            try:
                os.kill(p, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(p) for p in pids):
            time.sleep(0.5)
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not [p for p in cluster_pids(temp_dir) if alive(p)]
