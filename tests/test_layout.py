"""``--layout webdataset``: one standard tar per job shard, located member by member in the manifest.

The tars must open with Python's ``tarfile`` and the ``webdataset`` package, every member must
decode to the manifest's PSNR, a ranged read of ``offset``/``length`` must return the member's
bytes, decompress and ``--verify``/``--retire-originals`` must work on it, and an incremental
second run must add only new shards.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from ratefit.codecs.metrics import psnr
from ratefit.jobs import compress, decompress
from ratefit.jobs.spec import JobSpec, SpecError
from ratefit.workers.decompress import Restorer, read_stored
from ratefit.workers.items import StoredOutput
from ratefit.workers.layout import member_key
from ratefit.workers.storage import fetch_range, open_fs


def _rows(out) -> list[dict]:
    return ds.dataset(str(out) + "/_manifest", format="parquet").to_table().to_pylist()


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture()
def small_photos(samples_dir, tmp_path) -> Path:
    """The four sample photos at 192x128, one in a subfolder (keys keep their folders)."""
    root = tmp_path / "in"
    (root / "sub.dir").mkdir(parents=True)
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
        dst = root / ("sub.dir/" + name if name == "coffee.png" else name)
        Image.open(samples_dir / name).convert("RGB").resize((192, 128)).save(dst.with_suffix(".png"))
    return root


def test_member_keys_have_no_dot_in_the_file_name():
    assert member_key("a.b/c.d.png") == "a.b/c_d_png"
    assert member_key("x.jpg") == "x_jpg"


@pytest.mark.parametrize("codec", ["avif", "gain-hyperprior"])
def test_a_webdataset_job_writes_tar_shards_every_reader_opens(small_photos, tmp_path, codec):
    import webdataset as wds

    out = tmp_path / "out"
    summary = compress.run(JobSpec(input=str(small_photos), output=str(out), codec=codec, target_bpp=2.0,
                                   shard_size=2, layout="webdataset", verify=True, ms_ssim=False, in_process=True))
    rows = _rows(out)
    assert summary["statuses"] == {"ok": 4} and len(rows) == 4
    assert not list(out.rglob("*.avif")) and not list(out.rglob("*.rfic"))   # no loose outputs
    tars = sorted(out.glob("shards/*/shard-*.tar"))
    assert [t.name for t in tars] == ["shard-00000.tar", "shard-00001.tar"]
    assert tars[0].parent.name == rows[0]["run_id"]
    fs, _ = open_fs(str(out))
    restorer = Restorer()
    for row in rows:
        assert row["verified"] and row["output_uri"] == row["shard_uri"] and Path(row["shard_uri"]) in tars
        # The member the row locates, as tarfile sees it, and as one ranged read returns it.
        with tarfile.open(row["shard_uri"]) as tar:
            members = {m.name: m for m in tar.getmembers()}
            key = member_key(row["key"])
            name = next(n for n in members if n.startswith(key + ".") and not n.endswith(".json"))
            member = members[name]
            assert (member.offset_data, member.size) == (row["offset"], row["length"]) == (row["offset"], row["output_bytes"])
            blob = tar.extractfile(member).read()
            meta = json.loads(tar.extractfile(members[key + ".json"]).read())
        assert fetch_range(fs, row["shard_uri"], row["offset"], row["length"]) == blob
        assert meta["key"] == row["key"] and meta["psnr"] == pytest.approx(row["psnr"])
        restored = restorer.restore(blob, StoredOutput.of_row(row), row["key"])
        assert psnr(_pixels(small_photos / row["key"]), restored.pixels) == pytest.approx(row["psnr"], abs=1e-6)
        assert read_stored(fs, row["shard_uri"], StoredOutput.of_row(row)) == blob
    # webdataset groups each image's two members into one sample
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
    ext = "avif" if codec == "avif" else "ghp.rfic"
    assert sorted(s["__key__"] for s in samples) == sorted(member_key(r["key"]) for r in rows)
    assert all(set(s) >= {ext, "json"} for s in samples)

    restored_dir = tmp_path / "restored"
    summary = decompress.run(JobSpec(input=str(out), output=str(restored_dir), kind="decompress", in_process=True))
    assert summary["statuses"] == {"ok": 4}
    for row in rows:
        back = _pixels(restored_dir / row["key"])
        assert psnr(_pixels(small_photos / row["key"]), back) == pytest.approx(row["psnr"], abs=1e-6)


def test_an_incremental_webdataset_run_adds_only_new_shards(small_photos, tmp_path, samples_dir):
    out = tmp_path / "out"
    spec = dict(input=str(small_photos), output=str(out), codec="webp", target_bpp=1.0, shard_size=2,
                layout="webdataset", ms_ssim=False, in_process=True)
    compress.run(JobSpec(**spec))
    first = {p: p.read_bytes() for p in out.glob("shards/*/*.tar")}
    Image.open(samples_dir / "astronaut.png").convert("RGB").resize((160, 160)).save(small_photos / "new.png")
    compress.run(JobSpec(**spec))
    tars = sorted(out.glob("shards/*/*.tar"))
    added = [t for t in tars if t not in first]
    assert len(tars) == 3 and len(added) == 1 and added[0].parent != next(iter(first)).parent
    assert all(p.read_bytes() == data for p, data in first.items())   # committed shards never change
    with tarfile.open(added[0]) as tar:
        assert sorted(tar.getnames()) == ["new_png.json", "new_png.webp"]


def test_retiring_with_shards_waits_for_the_verified_tar(small_photos, tmp_path, monkeypatch):
    """A member that does not read back as written makes its row an error, so its original stays."""
    import ratefit.workers.layout as layout

    real_fetch = layout.fetch

    def corrupt_read_back(fs, path):
        data = bytearray(real_fetch(fs, path))
        data[600] ^= 0xFF   # inside the first member's bytes
        return bytes(data)

    monkeypatch.setattr(layout, "fetch", corrupt_read_back)
    out = tmp_path / "out"
    originals = sorted(p.relative_to(small_photos) for p in small_photos.rglob("*.png"))
    summary = compress.run(JobSpec(input=str(small_photos), output=str(out), codec="jpeg", target_bpp=1.5,
                                   shard_size=2, layout="webdataset", retire_originals=True, ms_ssim=False,
                                   in_process=True))
    rows = _rows(out)
    bad = [r for r in rows if r["status"] == "error"]
    assert len(bad) == 2 and all("verify" in r["error"] and not r["verified"] for r in bad)   # first member of each tar
    assert summary["retired_items"] == 2
    left = sorted(p.relative_to(small_photos) for p in small_photos.rglob("*.png"))
    assert left == sorted(Path(r["key"]) for r in bad) and set(left) < set(originals)


def test_webdataset_layout_on_s3_is_read_with_ranged_gets(s3_server, s3fs_client, small_photos):
    bucket = "layout-test"
    s3fs_client.mkdir(bucket)
    out = f"s3://{bucket}/out"
    opts = s3_server.storage_options
    compress.run(JobSpec(input=str(small_photos), output=out, codec="avif", target_bpp=1.0, shard_size=3,
                         layout="webdataset", verify=True, ms_ssim=False, in_process=True, storage_options=opts))
    fs, _ = open_fs(out, opts)
    rows = ds.dataset(f"{bucket}/out/_manifest", format="parquet", filesystem=s3fs_client).to_table().to_pylist()
    assert len(rows) == 4 and {r["shard_uri"].rsplit("/", 1)[-1] for r in rows} == {"shard-00000.tar", "shard-00001.tar"}
    for row in rows:
        blob = fetch_range(fs, row["shard_uri"], row["offset"], row["length"])
        with tarfile.open(fileobj=io.BytesIO(s3fs_client.cat_file(row["shard_uri"]))) as tar:
            assert tar.extractfile(member_key(row["key"]) + ".avif").read() == blob


def test_layout_is_checked_in_the_spec():
    with pytest.raises(SpecError, match="layout"):
        JobSpec(input="in", output="out", target_bpp=1.0, layout="zip")
    with pytest.raises(SpecError, match="budget"):
        JobSpec(input="in", output="out", budget_bpp=1.0, layout="webdataset")


def test_a_skipped_item_has_no_member(samples_dir, tmp_path):
    """The skip rule holds in tar shards: a result not smaller than its input is not stored."""
    src = tmp_path / "in"
    src.mkdir()
    tiny = Image.open(samples_dir / "rocket.jpg").convert("RGB").resize((64, 48))
    tiny.save(src / "tiny.jpg", quality=30)
    shutil.copy(samples_dir / "chelsea.png", src / "chelsea.png")
    out = tmp_path / "out"
    compress.run(JobSpec(input=str(src), output=str(out), codec="avif", target_bpp=8.0, strip_metadata=True,
                         layout="webdataset", ms_ssim=False, in_process=True))
    rows = {r["key"]: r for r in _rows(out)}
    assert rows["tiny.jpg"]["status"] == "skipped" and rows["tiny.jpg"]["shard_uri"] is None
    (tar_path,) = out.glob("shards/*/*.tar")
    with tarfile.open(tar_path) as tar:
        assert sorted(tar.getnames()) == ["chelsea_png.avif", "chelsea_png.json"]
