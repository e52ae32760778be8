"""Jobs against a real S3 server (SeaweedFS on 127.0.0.1) reached through s3fs, from Ray
worker processes: S3 → S3 compress, S3 → S3 decompress, listings on S3, no leaked secrets."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ratefit.codecs.metrics import psnr
from ratefit.jobs import decompress, recompress
from ratefit.jobs.spec import JobSpec
from ratefit.workers.manifest import parquet_table

pytestmark = pytest.mark.usefixtures("ray_session")


def read_manifest(fs, prefix: str) -> list[dict]:
    rows: list[dict] = []
    for path in sorted(fs.glob(f"{prefix}/_manifest/**/*.parquet")):
        rows += parquet_table(fs.cat_file(path)).to_pylist()
    return rows


@pytest.fixture()
def bucket(s3fs_client) -> str:
    name = f"rf-{uuid.uuid4().hex[:10]}"
    s3fs_client.mkdir(name)
    return name


def test_s3_to_s3_compress_and_decompress(s3_server, s3fs_client, bucket, photo_dir):
    fs = s3fs_client
    for f in photo_dir.rglob("*"):
        if f.is_file():
            fs.pipe_file(f"{bucket}/photos/{f.relative_to(photo_dir).as_posix()}", f.read_bytes())
    fs.pipe_file(f"{bucket}/photos/broken.png", b"\x89PNG\r\n\x1a\n broken")
    opts = s3_server.storage_options
    summary = recompress.run(JobSpec(input=f"s3://{bucket}/photos", output=f"s3://{bucket}/out", codec="webp",
                                     target_bpp=0.4, shard_size=2, storage_options=opts))
    assert summary["items"] == 4 and summary["statuses"] == {"ok": 3, "error": 1}
    rows = {r["input_uri"]: r for r in read_manifest(fs, f"{bucket}/out")}
    assert set(rows) == {f"s3://{bucket}/photos/{p}" for p in
                         ("chelsea.png", "sub dir/rocket launch.jpg", "sub dir/ünï/café.png", "broken.png")}
    ok = [r for r in rows.values() if r["status"] == "ok"]
    for r in ok:
        assert r["output_uri"].startswith(f"s3://{bucket}/out/") and r["bpp"] <= 0.4
        assert fs.size(r["output_uri"]) == r["output_bytes"]
    assert fs.exists(f"{bucket}/out/_SUCCESS")

    dsummary = decompress.run(JobSpec(input=f"s3://{bucket}/out", output=f"s3://{bucket}/restored",
                                      kind="decompress", storage_options=opts))
    assert dsummary["statuses"] == {"ok": 3}
    src = np.asarray(Image.open(photo_dir / "chelsea.png").convert("RGB"))
    back = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"{bucket}/restored/chelsea.png"))).convert("RGB"))
    assert psnr(src, back) == pytest.approx(rows[f"s3://{bucket}/photos/chelsea.png"]["psnr"], abs=1e-9)

    # Credentials passed in storage options never reach the outputs.
    success = fs.cat_file(f"{bucket}/out/_SUCCESS").decode()
    record = fs.cat_file(f"{bucket}/out/_ratefit_job.json").decode()
    manifest_text = json.dumps(list(rows.values()))
    for text in (success, record, manifest_text):
        assert s3_server.secret_key not in text
    assert json.loads(success)["spec"]["storage_options"]["secret"] == "***"


def test_listing_on_s3_reads_inputs_from_s3(s3_server, s3fs_client, bucket, samples_dir, tmp_path):
    import pyarrow as pa

    fs = s3fs_client
    fs.pipe_file(f"{bucket}/in/chelsea.png", (samples_dir / "chelsea.png").read_bytes())
    fs.pipe_file(f"{bucket}/in/coffee.png", (samples_dir / "coffee.png").read_bytes())
    buf = io.BytesIO()
    pq.write_table(pa.table({"uri": ["in/chelsea.png", f"s3://{bucket}/in/coffee.png"],
                             "target_bytes": [6000.0, 3000.0]}), buf)
    fs.pipe_file(f"{bucket}/listing.parquet", buf.getvalue())
    out = tmp_path / "out"   # S3 in, local out
    # strip_metadata: chelsea.png's 6 kB of XMP and profile would not fit its 6000-byte target
    summary = recompress.run(JobSpec(input=f"s3://{bucket}/listing.parquet", output=str(out), codec="jpeg",
                                     strip_metadata=True, storage_options=s3_server.storage_options))
    assert summary["statuses"] == {"ok": 2}
    rows = {r["input_uri"]: r for r in pq.read_table(str(out / "_manifest")).to_pylist()}
    assert 5000 < rows[f"s3://{bucket}/in/chelsea.png"]["output_bytes"] <= 6000
    assert 2000 < rows[f"s3://{bucket}/in/coffee.png"]["output_bytes"] <= 3000
    assert (out / "in" / "chelsea.png.jpg").exists() and (out / "in" / "coffee.png.jpg").exists()


def test_rerun_on_s3_sees_parts_written_by_workers(s3_server, s3fs_client, bucket, samples_dir):
    """Re-runs in one driver process: the driver's S3 listing cache must not hide new parts."""
    fs = s3fs_client
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        fs.pipe_file(f"{bucket}/in/{name}", (samples_dir / name).read_bytes())
    spec = JobSpec(input=f"s3://{bucket}/in", output=f"s3://{bucket}/out", codec="jpeg", target_bpp=0.7,
                   shard_size=1, ms_ssim=False, storage_options=s3_server.storage_options)
    first = recompress.run(spec)
    assert first["statuses"] == {"ok": 3} and first["new_items"] == 3
    # As if the run had been killed after committing two of its three parts.
    fs.rm(f"{bucket}/out/_manifest/run={first['run_id']}/part-00002.parquet")
    fs.rm(f"{bucket}/out/_state", recursive=True)
    fs.rm(f"{bucket}/out/_runs/{first['run_id']}.json")
    second = recompress.run(spec)
    assert second["items"] == 1 and second["unchanged_items"] == 2 and second["state"]["statuses"] == {"ok": 3}
    third = recompress.run(spec)
    assert third["items"] == 0 and third["unchanged_items"] == 3
    assert len(read_manifest(fs, f"{bucket}/out")) == 3


def test_s3_walk_pages_in_key_order_and_resumes_after_a_failed_page(s3_server, s3fs_client, bucket, monkeypatch):
    """Pages of 3 keys, and the store refuses every second page request once: the walk asks
    for the same page again, so nothing is skipped or listed twice, in the same order as a
    walk without failures (the order shards are cut in)."""
    from ratefit.jobs import plan
    from ratefit.workers import storage

    fs = s3fs_client
    keys = sorted([f"p/{c}{i}.png" for c in "ab" for i in range(4)] + ["p/sub/z.png", "p/sub dir/ü.png"])
    for k in keys:
        fs.pipe_file(f"{bucket}/{k}", b"x")
    fs.pipe_file(f"{bucket}/other/outside.png", b"x")
    monkeypatch.setattr(plan, "S3_PAGE_KEYS", 3)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    jfs, root = storage.open_fs(f"s3://{bucket}/p", s3_server.storage_options)
    clean = list(plan.walk_files(jfs, root))
    real_call, calls = jfs.call_s3, []

    def flaky_call(method, **params):
        calls.append(params.get("ContinuationToken"))
        if len(calls) % 2 == 0:
            raise ConnectionResetError("connection reset by peer")
        return real_call(method, **params)

    monkeypatch.setattr(jfs, "call_s3", flaky_call)
    listed = list(plan.walk_files(jfs, root))
    assert listed == clean
    assert sorted(p for p, _, _ in listed) == [f"{bucket}/{k}" for k in keys]
    assert all(size == 1 and version.startswith("etag:") for _, size, version in listed)
    assert len(calls) >= 2 * (len(keys) // 3)
