"""The cluster path for real: `ray start --head` on 127.0.0.1, then `ray job submit` of the
recompress entrypoint with a YAML spec, exactly as the README shows."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    bin_dir = Path(sys.executable).parent
    # Every port ray start would otherwise take at a fixed default (the dashboard agent's
    # 52365, the client server's 10001) is chosen free, so an embedded Ray of another test
    # in this session cannot collide with it.
    gcs_port, dash_port, agent_port, client_port = free_port(), free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rf-", dir="/tmp")   # keeps its ray_current_cluster apart
    # A single-machine cluster on loopback: see ratefit.cluster.connect.loopback_only.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={client_port}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited early:\n{head.stdout.read().decode(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the Ray dashboard (job server) did not come up in 120 s")
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break   # it answers (401 until a token is sent): it is up
            except OSError:
                time.sleep(1)
        yield url, env, f"127.0.0.1:{gcs_port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(10)   # `ray start --block` has not once exited on SIGTERM within 30 s here
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)


def test_ray_job_submit_runs_the_recompress_entrypoint(ray_head, photo_dir, tmp_path):
    url, env, _ = ray_head
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": str(photo_dir), "output": str(out), "codec": "jpeg",
                                    "target_bpp": 0.6, "shard_size": 1}))
    ray = str(Path(sys.executable).parent / "ray")
    deadline = time.monotonic() + 90
    while True:   # the job agent comes up a few seconds after the dashboard
        proc = subprocess.run(
            [ray, "job", "submit", "--address", url, "--", sys.executable, "-m", "ratefit.jobs.recompress",
             "--spec", str(spec)],
            env=env, capture_output=True, text=True, timeout=400)
        log = proc.stdout + proc.stderr
        if "No available agent" not in log or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower()
    assert "3 items: 3 ok" in log
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["statuses"] == {"ok": 3} and summary["shards"] == 3
    rows = pq.read_table(str(out / "_manifest")).to_pylist()
    assert len(rows) == 3 and all(r["bpp"] <= 0.6 for r in rows)


def test_a_driver_killed_on_a_standing_cluster_resumes_without_duplicates(ray_head, samples_dir, tmp_path):
    """Only the driver dies (SIGKILL); the cluster and, for a moment, the job's actors live
    on. Re-running the same command against the same cluster finishes the job: every input
    once, every row's file whole."""
    _, env, address = ray_head
    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        (src / f"img{i:02d}.png").write_bytes((samples_dir / "coffee.png").read_bytes())
    out = tmp_path / "out"
    args = [sys.executable, "-m", "ratefit.jobs.recompress", str(src), str(out), "--address", address,
            "--codec", "avif", "--target-bpp", "0.6", "--shard-size", "1", "--workers", "2", "--no-ms-ssim",
            "--no-progress"]
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "_manifest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if parts.exists() and len(list(parts.rglob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the driver ended before it could be killed"
    driver.kill()
    driver.wait(30)
    assert not (out / "_SUCCESS").exists()

    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["state"]["statuses"] == {"ok": 12} and summary["unchanged_items"] >= 2
    rows = pq.read_table(str(parts)).to_pylist()
    assert sorted(Path(r["input_uri"]).name for r in rows) == [f"img{i:02d}.png" for i in range(12)]
    for r in rows:
        assert Path(r["output_uri"]).stat().st_size == r["output_bytes"]
