"""The reading API (``workers/reading.py``): a compressed OUTPUT read from Python, every image of
its current state once, at the manifest's PSNR, from local folders and S3, loose files and tar
shards, through a plain iterator, a PyTorch DataLoader and a Ray Dataset; a corrupt output
names its key.

Small images and classical codecs keep it fast; the learned codec runs once, on two small images.
"""

from __future__ import annotations

import pickle
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ratefit.codecs.metrics import psnr
from ratefit.jobs import compress
from ratefit.jobs.spec import JobSpec
from ratefit.workers.manifest import current_state
from ratefit.workers.read import decode_image
from ratefit.workers.reading import CompressedImages, ReadError, key_of, read_output, ray_dataset, stored_rows
from ratefit.workers.storage import open_fs

KEYS = ["chelsea.png", "sub dir/rocket launch.jpg", "sub dir/ünï/café.png", "astronaut.png"]


@pytest.fixture()
def small_tree(tmp_path, samples_dir) -> Path:
    """The sample photos at 160x120 (plain RGB), with photo_dir's subfolders and non-ASCII names."""
    root = tmp_path / "in"
    sources = ("chelsea.png", "rocket.jpg", "coffee.png", "astronaut.png")
    for key, src in zip(KEYS, sources):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        im = Image.open(samples_dir / src).convert("RGB").resize((160, 120))
        im.save(root / key, quality=92) if key.endswith(".jpg") else im.save(root / key)
    return root


def _input_pixels(root: Path, key: str) -> np.ndarray:
    """The input's pixels as ratefit reads them (what each row's PSNR was measured against)."""
    return decode_image((root / key).read_bytes()).pixels


def _run(inp: str, out: str, codec: str = "webp", layout: str = "files", **kw) -> dict:
    spec = dict(input=inp, output=out, codec=codec, target_bpp=2.0, shard_size=2, in_process=True,
                ms_ssim=False, layout=layout)
    return compress.run(JobSpec(**{**spec, **kw}))


def _check_psnr(root: Path, key: str, pixels: np.ndarray, row: dict) -> None:
    assert pixels.dtype == np.uint8 and pixels.shape == (row["height"], row["width"], 3)
    assert psnr(_input_pixels(root, key), pixels) == pytest.approx(row["psnr"], abs=1e-6)


@pytest.mark.parametrize("layout,codec", [("files", "webp"), ("webdataset", "avif")])
def test_read_output_yields_every_image_once_at_its_psnr(small_tree, tmp_path, layout, codec):
    out = tmp_path / "out"
    summary = _run(str(small_tree), str(out), codec, layout)
    assert sum(summary["statuses"].values()) == 4
    fs, root = open_fs(str(out))
    expected = [r["key"] for r in current_state(fs, root).to_pylist() if r["status"] in ("ok", "unreachable")]
    assert sorted(expected) == sorted(KEYS)

    got = list(read_output(str(out), workers=3))
    assert [k for k, _, _ in got] == expected            # every image once, in manifest order
    for key, im, row in got:
        assert isinstance(im, Image.Image) and im.mode == "RGB" and row["key"] == key
        _check_psnr(small_tree, key, np.asarray(im), row)
        if layout == "webdataset":
            assert row["shard_uri"] and row["offset"] is not None
    arrays = {k: a for k, a, _ in read_output(str(out), as_array=True, workers=1)}
    assert all(np.array_equal(arrays[k], np.asarray(im)) for k, im, _ in got)
    assert all(a.flags.writeable for a in arrays.values())


def test_reading_over_s3_from_tar_shards(s3_server, s3fs_client, small_tree):
    """Tar members come back by ranged GETs; the DataLoader's workers each open their own S3 client."""
    import torch

    fs, opts = s3fs_client, s3_server.storage_options
    bucket = f"rf-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    for key in KEYS:
        fs.pipe_file(f"{bucket}/in/{key}", (small_tree / key).read_bytes())
    summary = _run(f"s3://{bucket}/in", f"s3://{bucket}/out", "jpeg", "webdataset", storage_options=opts)
    assert sum(summary["statuses"].values()) == 4

    got = list(read_output(f"s3://{bucket}/out", storage_options=opts, as_array=True, workers=2))
    assert sorted(k for k, _, _ in got) == sorted(KEYS)
    for key, pixels, row in got:
        assert row["shard_uri"].startswith(f"s3://{bucket}/out/shards/")
        _check_psnr(small_tree, key, pixels, row)

    ds = CompressedImages(f"s3://{bucket}/out", storage_options=opts)
    keys = [key for key, _, _ in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
    assert sorted(keys) == sorted(KEYS)


def test_an_incremental_output_reads_as_its_current_state(small_tree, tmp_path, samples_dir):
    out = tmp_path / "out"
    first = _run(str(small_tree), str(out), "jpeg")
    Image.open(samples_dir / "coffee.png").convert("RGB").resize((128, 96)).save(small_tree / "sub dir" / "new.png")
    second = _run(str(small_tree), str(out), "jpeg")
    assert second["run_id"] != first["run_id"] and second["items"] == 1
    got = list(read_output(str(out)))
    keys = [k for k, _, _ in got]
    assert Counter(keys) == Counter(KEYS + ["sub dir/new.png"])   # once each: no duplicates
    runs = {row["key"]: row["run_id"] for _, _, row in got}
    assert runs["sub dir/new.png"] == second["run_id"] and runs["chelsea.png"] == first["run_id"]
    for key, im, row in got:
        _check_psnr(small_tree, key, np.asarray(im), row)


def test_rows_without_a_key_derive_it_from_the_output_path(small_tree, tmp_path):
    """Manifests written before the ``key`` column: the key comes from ``output_uri``."""
    out = tmp_path / "out"
    _run(str(small_tree), str(out), "jpeg")
    for part in list(out.glob("_manifest/**/*.parquet")) + list(out.glob("_state/*.parquet")):
        t = pq.read_table(part)
        pq.write_table(t.set_column(t.schema.get_field_index("key"), "key", pa.nulls(len(t), pa.string())), part)
    assert all(r["key"] is None for r in current_state(*open_fs(str(out))).to_pylist())
    assert sorted(r["key"] for r in stored_rows(str(out))) == sorted(KEYS)
    assert sorted(k for k, _, _ in read_output(str(out))) == sorted(KEYS)
    assert key_of("/o/a/b.png.ghp.rfic", "/o/") == "a/b.png" and key_of("/o/a/b.jpg.avif", "/o/") == "a/b.jpg"


def test_dataloader_workers_share_the_rows(small_tree, tmp_path):
    import torch

    out = tmp_path / "out"
    _run(str(small_tree), str(out), "webp", "webdataset")
    ds = CompressedImages(str(out), workers=1)
    assert len(ds) == 4
    items = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    assert Counter(k for k, _, _ in items) == Counter(KEYS)
    for key, pixels, row in items:
        assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and row["key"] == key
        assert isinstance(row, dict) and isinstance(row["psnr"], float)   # the row is not collated
        _check_psnr(small_tree, key, pixels.numpy(), row)
    sized = CompressedImages(str(out), transform=lambda key, image, row: (key, image.shape))
    assert sorted(sized) == sorted((k, (120, 160, 3)) for k in KEYS)


def test_the_learned_codec_round_trips_at_its_psnr(small_tree, tmp_path):
    src = tmp_path / "two"
    src.mkdir()
    for key in KEYS[:2]:   # two images, 128x96
        Image.open(small_tree / key).resize((128, 96)).save(src / Path(key).name)
    out = tmp_path / "out"
    summary = _run(str(src), str(out), "gain-hyperprior", target_bpp=1.0, codec_options={"device": "cpu"})
    assert sum(summary["statuses"].values()) == 2
    got = list(read_output(str(out), workers=2, codec_options={"gain-hyperprior": {"device": "cpu"}}))
    assert sorted(k for k, _, _ in got) == sorted(Path(k).name for k in KEYS[:2])
    for key, im, row in got:
        assert row["output_uri"].endswith(".ghp.rfic")
        _check_psnr(src, key, np.asarray(im), row)


def test_a_jpeg_restored_byte_for_byte_reads_as_the_original_file(small_tree, tmp_path):
    """jxl-lossless of a JPEG: the image is the original JPEG itself; the array its pixels."""
    src = tmp_path / "jpegs"
    (src / "sub dir").mkdir(parents=True)
    (src / "sub dir" / "rocket launch.jpg").write_bytes((small_tree / "sub dir" / "rocket launch.jpg").read_bytes())
    out = tmp_path / "out"
    summary = _run(str(src), str(out), "jxl-lossless", "webdataset", target_bpp=None)
    assert summary["statuses"] == {"ok": 1}
    [(key, im, row)] = list(read_output(str(out)))
    assert key == "sub dir/rocket launch.jpg" and row["exact_original"] and im.format == "JPEG"
    assert im.tobytes() == Image.open(src / key).tobytes()
    [(_, pixels, _)] = list(read_output(str(out), as_array=True))
    assert np.array_equal(pixels, _input_pixels(src, key))


@pytest.mark.parametrize("layout", ["files", "webdataset"])
def test_a_corrupt_output_names_its_key(small_tree, tmp_path, layout, caplog):
    out = tmp_path / "out"
    _run(str(small_tree), str(out), "webp", layout)
    rows = {r["key"]: r for r in stored_rows(str(out))}
    bad = rows["sub dir/rocket launch.jpg"]
    path = Path(bad["output_uri"])
    data = bytearray(path.read_bytes())
    at = (bad["offset"] or 0) + 40
    data[at:at + 16] = b"\xff" * 16   # the file's (or the tar member's) bytes, same length
    path.write_bytes(bytes(data))

    with pytest.raises(ReadError, match="sub dir/rocket launch.jpg: cannot read .*checksum mismatch") as e:
        list(read_output(str(out), workers=2))
    assert e.value.key == "sub dir/rocket launch.jpg"
    again = pickle.loads(pickle.dumps(e.value))   # as it comes back from a DataLoader worker or Ray task
    assert (str(again), again.key, again.uri) == (str(e.value), e.value.key, e.value.uri)
    skipped = [k for k, _, _ in read_output(str(out), errors="skip")]
    assert sorted(skipped) == sorted(set(KEYS) - {"sub dir/rocket launch.jpg"})
    assert "skipped sub dir/rocket launch.jpg" in caplog.text


def test_reading_a_folder_without_a_manifest_refuses(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ratefit manifest"):
        read_output(str(tmp_path))
    with pytest.raises(ValueError, match="errors"):
        read_output(str(tmp_path), errors="ignore")


def test_stopping_early_leaves_no_reader_running(small_tree, tmp_path):
    import threading

    out = tmp_path / "out"
    _run(str(small_tree), str(out), "jpeg")
    it = read_output(str(out), workers=4)
    assert next(it)[0] in KEYS
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ratefit-read")]


def test_a_ray_dataset_reads_every_image(ray_session, small_tree, tmp_path):
    out = tmp_path / "out"
    _run(str(small_tree), str(out), "avif", "webdataset")
    rows = {r["key"]: r for r in stored_rows(str(out))}
    # one reading process (a cold Ray worker imports torch); read once: count() alone reads nothing
    ds = ray_dataset(str(out), concurrency=1).materialize()
    assert ds.count() == 4
    items = ds.take_all()
    assert sorted(i["key"] for i in items) == sorted(KEYS)
    one = next(i for i in items if i["key"] == "sub dir/ünï/café.png")
    assert one["codec"] == "avif" and one["psnr"] == rows[one["key"]]["psnr"] and one["bpp"] == rows[one["key"]]["bpp"]
    _check_psnr(small_tree, one["key"], np.asarray(one["image"]), rows[one["key"]])
