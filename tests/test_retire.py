"""Retiring originals inside one shard worker (no Ray): a retried shard whose part is committed
keeps its rows, and its originals are retired once, with one tombstone each."""

from __future__ import annotations

import dataclasses
import shutil

import pyarrow.parquet as pq

from ratefit.codecs.rate import Target
from ratefit.jobs.plan import iter_folder
from ratefit.workers.actor import ShardWorker
from ratefit.workers.compress import CompressConfig
from ratefit.workers.items import Shard
from ratefit.workers.manifest import committed_rows

RUN = "20261127T000000Z-abcdef"


def _setup(tmp_path, samples_dir, retire: bool):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(samples_dir / name, src / name)
    config = CompressConfig(output=str(tmp_path / "out"), codec="jpeg", target=Target("bpp", 0.6), verify=True,
                            ms_ssim=False, manifest_dir=f"_manifest/run={RUN}", run_id=RUN, retire=retire)
    shard = Shard(0, tuple(iter_folder(str(src), (".png",))))
    return src, config, shard


def _tombs(tmp_path) -> list[dict]:
    return pq.read_table(tmp_path / "out" / "_retired" / f"run={RUN}" / "part-00000.parquet").to_pylist()


def test_a_retry_after_the_commit_keeps_the_rows_and_retires_once(tmp_path, samples_dir):
    src, config, shard = _setup(tmp_path, samples_dir, retire=True)
    first = ShardWorker(config).process(shard, 1)
    assert first["stats"]["retired"] == 2 and not list(src.iterdir())
    manifest_root = str(tmp_path / "out" / "_manifest" / f"run={RUN}")
    rows = committed_rows(_local(), manifest_root, 0)
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["verified"] for r in rows)

    again = ShardWorker(config).process(shard, 2)   # as if the worker died before returning
    assert again["statuses"] == {"ok": 2} and again["stats"]["retired"] == 0
    assert committed_rows(_local(), manifest_root, 0) == rows, "the committed rows were not redone"
    assert sorted(t["action"] for t in _tombs(tmp_path)) == ["deleted", "deleted"]


def test_a_worker_that_died_between_commit_and_retiring_is_finished_by_the_retry(tmp_path, samples_dir):
    src, config, shard = _setup(tmp_path, samples_dir, retire=False)
    ShardWorker(config).process(shard, 1)            # committed, nothing retired (the "crash")
    assert len(list(src.iterdir())) == 2
    retry = ShardWorker(dataclasses.replace(config, retire=True)).process(shard, 2)
    assert retry["statuses"] == {"ok": 2} and retry["stats"]["retired"] == 2 and not list(src.iterdir())
    assert sorted(t["input_uri"].rsplit("/", 1)[-1] for t in _tombs(tmp_path)) == ["chelsea.png", "coffee.png"]


def _local():
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()
