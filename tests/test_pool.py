"""The one pool every pass runs on: the in-process form runs the same shard code as the Ray
actors, gives the same rows, and retries a crashing shard the same way; how the Ray pool sizes
itself from the cluster's nodes (tests/test_autoscale.py has nodes join and leave for real)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from ratefit.jobs import recompress
from ratefit.jobs.build import build_pass, plan_shards
from ratefit.jobs.errors import JobError
from ratefit.jobs.pool import MAX_ACTORS_PER_GPU, MAX_ATTEMPTS, LocalPool, RayPool, Sizing, pool_size
from ratefit.jobs.spec import JobSpec
from ratefit.workers.items import Shard

KEYS = ("input_uri", "status", "codec", "output_bytes", "bpp", "psnr", "rate_param", "encodes")


def _rows(out) -> list[tuple]:
    rows = ds.dataset(str(out / "_manifest"), format="parquet").to_table().to_pylist()
    return sorted(tuple(r[k] for k in KEYS) for r in rows)


@pytest.mark.usefixtures("ray_session")
def test_in_process_and_ray_pools_write_the_same_rows(photo_dir, tmp_path):
    base = dict(input=str(photo_dir), codec="jpeg", target_bpp=0.7, shard_size=2, ms_ssim=False)
    ray_run = recompress.run(JobSpec(**base, output=str(tmp_path / "ray")))
    local_run = recompress.run(JobSpec(**base, output=str(tmp_path / "local"), in_process=True))
    assert ray_run["statuses"] == local_run["statuses"] == {"ok": 3}
    strip = [(r[0].replace(str(tmp_path / "ray"), ""),) + r[1:] for r in _rows(tmp_path / "ray")]
    assert strip == [(r[0].replace(str(tmp_path / "local"), ""),) + r[1:] for r in _rows(tmp_path / "local")]


def test_local_pool_retries_a_crashing_shard_then_reports_it(photo_dir, tmp_path, monkeypatch):
    from ratefit.workers.actor import ShardWorker

    spec = JobSpec(input=str(photo_dir), output=str(tmp_path / "out"), codec="jpeg", target_bpp=0.7, shard_size=2)
    job_pass = build_pass(spec, "encode")
    calls: list[tuple[int, int]] = []
    real = ShardWorker.process

    def flaky(self, shard: Shard, attempt: int = 1):
        calls.append((shard.index, attempt))
        if shard.index == 0 and attempt < 2:
            raise RuntimeError("worker crashed")
        if shard.index == 1:
            raise RuntimeError("always crashes")
        return real(self, shard, attempt)

    monkeypatch.setattr(ShardWorker, "process", flaky)
    pool = LocalPool(job_pass.config, spec.storage_retry_s)
    done = {d.shard.index: d for d in pool.run(plan_shards(spec))}
    assert done[0].summary is not None and done[0].attempts == 2
    assert done[1].summary is None and done[1].attempts == MAX_ATTEMPTS and "always crashes" in done[1].failure
    assert calls == [(0, 1), (0, 2)] + [(1, a) for a in range(1, MAX_ATTEMPTS + 1)]
    assert pool.retried == 1 + (MAX_ATTEMPTS - 1)


def test_a_codec_that_cannot_be_built_stops_the_in_process_job_before_output_is_touched(photo_dir, tmp_path):
    out = tmp_path / "out"
    spec = JobSpec(input=str(photo_dir), output=str(out), codec="gain-hyperprior", target_bpp=0.5, in_process=True,
                   weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(JobError, match="the workers could not start"):
        recompress.run(spec)
    assert not out.exists()


# ---------------------------------------------------------------- sizing (a pure function of the nodes)
def test_cpu_codecs_take_one_actor_per_cpu_of_every_node():
    assert pool_size([{"CPU": 2.0}, {"CPU": 4.0}], "cpu") == Sizing(0, 0.0, 6, False)
    # A CPU codec on a GPU node uses its CPUs and asks for no GPU.
    assert pool_size([{"CPU": 16.0, "GPU": 1.0}], "cpu") == Sizing(0, 0.0, 16, False)
    # No CPU anywhere yet (a KubeRay head with num-cpus 0): one actor, pending until a node comes.
    assert pool_size([{"CPU": 0.0}], "cpu") == Sizing(0, 0.0, 1, False)
    assert pool_size([{"CPU": 2.0}, {"CPU": 4.0}], "cpu", workers=3) == Sizing(0, 0.0, 3, False)


def test_cuda_codecs_share_each_gpu_among_the_cpus_of_its_node():
    assert MAX_ACTORS_PER_GPU == 8
    # 16 CPUs per GPU: capped at 8 actors per GPU (GPU memory), 1/8 of the GPU each.
    assert pool_size([{"CPU": 16.0, "GPU": 1.0}], "cuda") == Sizing(8, 0.125, 0, True)
    # 4 CPUs per GPU: 4 actors per GPU.
    assert pool_size([{"CPU": 4.0, "GPU": 1.0}], "cuda") == Sizing(4, 0.25, 0, True)
    assert pool_size([{"CPU": 16.0, "GPU": 4.0}], "cuda") == Sizing(16, 0.25, 0, True)
    # 3 per GPU: the share is rounded down to Ray's granularity, so 3 of them fit on one GPU.
    s = pool_size([{"CPU": 12.0, "GPU": 4.0}], "cuda")
    assert (s.gpu_actors, s.gpus_per_actor) == (12, 0.3333) and 3 * s.gpus_per_actor <= 1
    # Mixed: a head without GPU (its CPUs: stand-ins) and two GPU node shapes. The share is the
    # smallest one (8 per GPU); each GPU node holds no more actors than it has CPUs.
    s = pool_size([{"CPU": 8.0}, {"CPU": 16.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}], "cuda")
    assert s == Sizing(8 + 4, 0.125, 8, True)


def test_cuda_codecs_without_a_gpu_ask_for_one_and_run_cpu_standins():
    # The pending GPU actor is the autoscaler's demand; the head's CPUs run stand-ins meanwhile.
    assert pool_size([{"CPU": 2.0}], "cuda") == Sizing(1, 0.125, 2, True)
    assert pool_size([{"CPU": 0.0}], "cuda") == Sizing(1, 0.125, 0, True)   # nothing runs until a GPU node joins
    # An embedded Ray never gains a node: no demand, the codec simply runs on CPU actors.
    assert pool_size([{"CPU": 2.0}], "cuda", demand=False) == Sizing(0, 0.0, 2, False)
    assert pool_size([{"CPU": 2.0, "GPU": 1.0}], "cuda", demand=False) == Sizing(2, 0.5, 0, True)


def test_the_spec_overrides_the_sizing():
    nodes = [{"CPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}]
    assert pool_size(nodes, "cuda", gpus_per_worker=0) == Sizing(0, 0.0, 18, False)   # CPU only, no GPU asked for
    assert pool_size(nodes, "cuda", gpus_per_worker=1.0) == Sizing(2, 1.0, 0, False)  # GPU only, no stand-ins
    assert pool_size(nodes, "cpu", gpus_per_worker=0.5) == Sizing(4, 0.5, 0, False)
    assert pool_size([{"CPU": 1.0}], "cuda", gpus_per_worker=0.25) == Sizing(1, 0.25, 0, False)   # demand
    # workers: a fixed number of each kind, asked for whether it fits or not (stand-ins: no more
    # than the CPUs of the nodes without GPUs).
    assert pool_size(nodes, "cuda", workers=3) == Sizing(3, 0.125, 2, True)
    assert pool_size([{"CPU": 2.0}], "cuda", workers=3, gpus_per_worker=1.0) == Sizing(3, 1.0, 0, False)
    assert pool_size(nodes, "cuda", workers=5, gpus_per_worker=0) == Sizing(0, 0.0, 5, False)
    # min_workers: at least that many are asked for (the rest of them are demand).
    assert pool_size([{"CPU": 2.0}], "cpu", min_workers=4) == Sizing(0, 0.0, 4, False)
    assert pool_size([{"CPU": 2.0}], "cuda", min_workers=4) == Sizing(4, 0.125, 2, True)
    assert pool_size([{"CPU": 16.0, "GPU": 1.0}], "cuda", min_workers=4) == Sizing(8, 0.125, 0, True)


def test_min_workers_and_worker_wait_are_validated_parsed_and_not_hashed(tmp_path):
    import argparse
    import math

    from ratefit.jobs import cli
    from ratefit.jobs.spec import SpecError

    base = dict(input=str(tmp_path), output=str(tmp_path / "out"), codec="jpeg", target_bpp=1.0)
    spec = JobSpec(**base)
    assert (spec.min_workers, spec.worker_wait_s) == (1, 600.0)
    for bad in (0, -1, 1.5, True, "2", None):
        with pytest.raises(SpecError, match="min_workers"):
            JobSpec(**base, min_workers=bad)
    with pytest.raises(SpecError, match="min_workers: 3 is more than the 2 workers"):
        JobSpec(**base, min_workers=3, workers=2)
    for bad in (0, -1, math.inf, math.nan, True, "10", None):
        with pytest.raises(SpecError, match="worker_wait_s"):
            JobSpec(**base, worker_wait_s=bad)
    assert JobSpec(**base, min_workers=4, worker_wait_s=5).spec_hash() == spec.spec_hash()
    p = argparse.ArgumentParser()
    cli.add_compress_arguments(p)
    parsed = cli.spec_from_args(p.parse_args([str(tmp_path), str(tmp_path / "o"), "--codec", "jpeg", "--target-bpp",
                                              "1", "--min-workers", "3", "--worker-wait", "2.5"]))
    assert (parsed.min_workers, parsed.worker_wait_s) == (3, 2.5)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "--min-workers" in readme and "--worker-wait" in readme


def test_workers_that_never_become_ready_stop_the_job_with_what_they_ask_for(ray_session, tmp_path):
    """A whole GPU per worker on the embedded Ray (which has none and never gains a node): the
    worker stays pending, and past --worker-wait the job stops and says why."""
    from ratefit.codecs.rate import Target
    from ratefit.workers.compress import CompressConfig

    config = CompressConfig(output=str(tmp_path / "out"), codec="jpeg", target=Target("bpp", 1.0), ms_ssim=False)
    t0 = time.monotonic()
    with pytest.raises(JobError) as e:
        RayPool(config, "cpu", 120.0, gpus_per_worker=1.0, worker_wait_s=3.0)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "only 0 of 1 workers (--min-workers) were ready after 3 s (--worker-wait)" in msg
    assert "1 CPU + 1 GPU" in msg and "2 CPU" in msg and "1 alive node" in msg
    assert not (tmp_path / "out").exists()


def test_a_pool_reports_its_workers_in_the_summary(ray_session, photo_dir, tmp_path):
    base = dict(input=str(photo_dir), codec="jpeg", target_bpp=0.7, shard_size=1, ms_ssim=False)
    summary = recompress.run(JobSpec(**base, output=str(tmp_path / "ray"), min_workers=2))
    assert summary["workers"]["started"] == 2 and summary["workers"]["peak"] == 2
    assert summary["workers"]["gpu"] == 0
    local = recompress.run(JobSpec(**base, output=str(tmp_path / "local"), in_process=True))
    assert local["workers"] == {"started": 1, "peak": 1, "gpu": 0}
