"""The one pool every pass runs on: the in-process form runs the same shard code as the Ray
actors, gives the same rows, and retries a crashing shard the same way."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from ratefit.jobs import recompress
from ratefit.jobs.build import build_pass, plan_shards
from ratefit.jobs.errors import JobError
from ratefit.jobs.pool import MAX_ATTEMPTS, LocalPool
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
