"""The pool follows the cluster, for real: a standing `ray start --head` cluster on 127.0.0.1
(conftest.ray_cluster) gains a worker node mid-job, as an autoscaler adds one, and loses it
again. The pool grows onto the new node, drops the workers of the node that left (their shards
are retried elsewhere), and the job ends with every input once.

The driver is `python -m ratefit.jobs.recompress --address ...` in a process of its own, as
`ray job submit` runs it: a process holds one Ray connection, and this one (pytest) may hold the
session's embedded Ray; the cluster's token and loopback settings are its environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ray_cluster, stop_ray_node
from PIL import Image


def _inputs(src: Path, samples_dir: Path, n: int, size: tuple[int, int]) -> list[str]:
    src.mkdir()
    photo = Image.open(samples_dir / "coffee.png").convert("RGB").resize(size)
    names = [f"img{i:02d}.png" for i in range(n)]
    for i, name in enumerate(names):   # each a little different: no two outputs alike
        photo.rotate(i * 3).save(src / name)
    return names


def _driver(cluster, src: Path, out: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "ratefit.jobs.recompress", str(src), str(out), "--address",
                                 cluster.address, "--shard-size", "1", "--no-ms-ssim", "--no-progress", *args],
                                env=cluster.env, stdout=f, stderr=subprocess.STDOUT)


def _parts(out: Path) -> int:
    return len(list((out / "_manifest").rglob("part-*.parquet"))) if (out / "_manifest").exists() else 0


def _wait(what: str, until, driver: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if driver.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{log.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:g} s:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)


def _finish(driver: subprocess.Popen, log: Path, out: Path, names: list[str]) -> dict:
    try:
        rc = driver.wait(400)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail(f"the job did not finish in 400 s:\n{log.read_text(errors='replace')[-4000:]}")
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["state"]["statuses"] == {"ok": len(names)}, text[-4000:]
    rows = pq.read_table(str(out / "_manifest")).to_pylist()
    assert sorted(Path(r["input_uri"]).name for r in rows) == names   # every input once
    for r in rows:
        assert r["status"] == "ok" and Path(r["output_uri"]).stat().st_size == r["output_bytes"]
    return summary


def _wait_node(cluster, node: subprocess.Popen, timeout: float = 180) -> None:
    """Until the joining node's `ray start` says its runtime is up."""
    log = Path(cluster.temp_dir) / f"node-{cluster.nodes.index(node)}.log"
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in (log.read_text(errors="replace") if log.exists() else ""):
        if node.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the joining node did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def _shard_workers(cluster) -> int:
    """ShardWorker actor processes of ``cluster``'s nodes: children of its raylets (a raylet
    runs in its `ray start`'s session; an actor's process gets a session of its own), so the
    actors of any other Ray on this machine do not count."""
    groups = {str(p.pid) for p in [cluster.head, *cluster.nodes]}
    # -ww: all of each command line, whatever COLUMNS says (pytest sets it).
    table = [line.split(None, 3) for line in subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,pgid=,args="],
                                                           capture_output=True, text=True).stdout.splitlines()]
    raylets = {pid for pid, _, pgid, args in (r for r in table if len(r) == 4)
               if pgid in groups and "/raylet/raylet" in args.split(" ", 1)[0]}
    return sum(1 for r in table if len(r) == 4 and r[1] in raylets and r[3].startswith("ray::ShardWorker"))


def test_a_node_joining_mid_job_gets_workers_and_one_leaving_loses_nothing(samples_dir, tmp_path):
    """A CPU codec on a 1-CPU head: one worker. A 2-CPU node joins: the pool grows to 3. The
    node leaves again (SIGTERM, as a scale-down or preemption): its workers die, their shards
    are retried on the head's worker, and no replacement is left waiting for it."""
    names = _inputs(tmp_path / "in", samples_dir, 24, (360, 240))
    out, log = tmp_path / "out", tmp_path / "driver.log"
    with ray_cluster(num_cpus=1) as cluster:
        driver = _driver(cluster, tmp_path / "in", out, log, "--codec", "avif", "--target-bpp", "0.6")
        try:
            _wait("first committed shard", lambda: _parts(out) >= 1, driver, log)
            assert _shard_workers(cluster) == 1
            # The driver is paused while the node starts (on a busy machine `ray start` can take
            # longer than the whole job), then the pool must find the node by itself.
            os.kill(driver.pid, signal.SIGSTOP)
            try:
                node = cluster.add_node(num_cpus=2)
                _wait_node(cluster, node)
            finally:
                os.kill(driver.pid, signal.SIGCONT)
            _wait("workers on the new node", lambda: _shard_workers(cluster) >= 3, driver, log)
            grown_at = _parts(out)
            _wait("shards done by the grown pool", lambda: _parts(out) >= grown_at + 3, driver, log)
            assert _parts(out) < len(names) - 2, "the job ended too soon to lose a node mid-job"
            stop_ray_node(node)
            summary = _finish(driver, log, out, names)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(30)
    workers = summary["workers"]
    assert workers["started"] == 1 and workers["peak"] == 3 and workers["gpu"] == 0, workers
    text = log.read_text()
    assert "died" in text or "a node left the cluster" in text, text[-4000:]


@pytest.mark.slow
def test_a_cuda_codec_waits_for_gpu_workers_on_cpu_standins(samples_dir, tmp_path):
    """gain-hyperprior prefers CUDA; the 1-CPU head has no GPU. The pool asks Ray for a GPU
    worker (pending: an autoscaler's demand) and runs a CPU stand-in meanwhile. A node with a
    (logical) GPU and 2 CPUs joins: the pending worker starts there and a second one joins it
    (2 CPUs per GPU: half a GPU each); they build the codec on the CPU (there is no CUDA here),
    the stand-in stops, and the job completes. About 60 s on 2 cores."""
    names = _inputs(tmp_path / "in", samples_dir, 40, (384, 256))
    out, log = tmp_path / "out", tmp_path / "driver.log"
    with ray_cluster(num_cpus=1) as cluster:
        driver = _driver(cluster, tmp_path / "in", out, log, "--codec", "gain-hyperprior", "--target-bpp", "0.5")
        try:
            _wait("first committed shard", lambda: _parts(out) >= 1, driver, log)
            assert "no GPU in the cluster yet" in log.read_text()
            cluster.add_node(num_cpus=2, num_gpus=1)
            summary = _finish(driver, log, out, names)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(30)
    workers = summary["workers"]
    # Usually 2 GPU workers (the demand one, then a second); the job may end before the second.
    assert workers["started"] == 1 and workers["gpu"] >= 1, workers
    assert "GPU workers are ready: the 1 CPU worker(s) finish their shards and stop" in log.read_text()
