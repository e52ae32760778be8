"""The cluster path for real: `ray start --head` on 127.0.0.1, then `ray job submit` of the
recompress entrypoint with a YAML spec, exactly as the README shows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ray_cluster


@pytest.fixture(scope="module")
def ray_head():
    """A head with 2 CPUs and its dashboard (the job server) on 127.0.0.1 (conftest.ray_cluster)."""
    with ray_cluster(num_cpus=2, dashboard=True) as cluster:
        url = cluster.dashboard_url
        deadline = time.monotonic() + 120
        while True:
            if cluster.head.poll() is not None:
                pytest.fail("ray start exited early:\n"
                            f"{(Path(cluster.temp_dir) / 'head.log').read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the Ray dashboard (job server) did not come up in 120 s")
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break   # it answers (401 until a token is sent): it is up
            except OSError:
                time.sleep(1)
        yield url, cluster.env, cluster.address


def test_ray_job_submit_runs_the_recompress_entrypoint(ray_head, photo_dir, tmp_path):
    url, env, _ = ray_head
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": str(photo_dir), "output": str(out), "codec": "jpeg",
                                    "target_bpp": 0.6, "shard_size": 1, "progress_every_s": 0.5}))
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
    # Not a terminal under Ray: progress comes as lines in the job log, the final one at the end.
    assert re.search(r"ratefit compress: done, 3 items in \S+, [\d.]+ img/s, [\d.]+ MB/s, 0 errors", log), log[-4000:]
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
