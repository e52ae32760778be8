"""``--item-timeout``: an item whose read, decode or encode hangs becomes one error row at its
stage, the rest of its shard goes on on a fresh codec, the job finishes, and the hung item
never writes anything. Under Ray the actor that held the hung thread is replaced.

The hangs are real: a registered test codec whose encode (or decode) blocks on one image
(an Event the test sets at the end, so nothing waits for the sleeper), and, for the Ray
workers (which cannot see codecs registered here), an input that is a FIFO nobody writes:
reading it blocks in ``open``.
"""

from __future__ import annotations

import gc
import io
import math
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from ratefit.codecs import registry
from ratefit.codecs.base import Capabilities, CodecError, ControlRange
from ratefit.jobs import cli, decompress, recompress
from ratefit.jobs.spec import JobSpec, SpecError
from ratefit.workers import processor as processor_mod
from ratefit.workers.processor import ItemCancelled, Stages

HANG_SIZE = (97, 61)   # the one image (width, height) the test codec hangs on
TIMEOUT_S = 1.0


class _Hang:
    """What the test codec does: hang ``encode`` or ``decode`` once on HANG_SIZE, until released."""

    def __init__(self) -> None:
        self.on: str | None = None          # "encode" | "decode" | None
        self.release = threading.Event()
        self.entered = threading.Event()
        self.built = 0                      # codec instances built (a fresh one after a timeout)

    def maybe(self, what: str, size: tuple[int, int]) -> None:
        if self.on == what and size == HANG_SIZE and not self.entered.is_set():
            self.entered.set()
            self.release.wait(30)           # "sleeps": until the test is done with it


class HangingJpeg:
    """A small JPEG codec of the test's own (like the README's plugin example) that hangs once."""

    name, extension = "test-hang", "hang.rfic"
    control = ControlRange("quality", 0, 100, increasing=True, discrete=True)
    weights_sha256, device, speed = b"", "cpu", "fast"

    def __init__(self, hang: _Hang):
        self.hang = hang

    def prepare(self, image):
        return Image.fromarray(image, "RGB")

    def estimate(self, prepared, value):
        return None

    def encode(self, prepared, value):
        self.hang.maybe("encode", prepared.size)
        buf = io.BytesIO()
        prepared.save(buf, format="JPEG", quality=int(round(value)))
        return buf.getvalue()

    def decode(self, payload, width, height, value):
        self.hang.maybe("decode", (width, height))
        try:
            with Image.open(io.BytesIO(payload), formats=["JPEG"]) as im:
                if im.size != (width, height):
                    raise CodecError(f"payload is {im.size}, header says {width}x{height}")
                return np.asarray(im.convert("RGB"))
        except CodecError:
            raise
        except Exception as e:
            raise CodecError(f"payload does not decode: {e}") from e


@pytest.fixture()
def hang(monkeypatch):
    state = _Hang()
    registry.list_codecs()   # built-ins and plugins first, then a private copy to register into
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))

    def factory(**options):
        state.built += 1
        return HangingJpeg(state)

    factory.capabilities = Capabilities(preferred_device="cpu")
    registry.register("test-hang", factory)

    # Record every item that was abandoned and then stopped at its next stage boundary.
    state.cancelled = threading.Event()
    real_append = Stages.append

    def append(self, stage):
        try:
            real_append(self, stage)
        except ItemCancelled:
            state.cancelled.set()
            raise

    monkeypatch.setattr(Stages, "append", append)
    yield state
    state.release.set()


@pytest.fixture()
def photos(tmp_path, samples_dir) -> Path:
    """Five small photos; img1 has the size the test codec hangs on."""
    src = tmp_path / "in"
    src.mkdir()
    base = Image.open(samples_dir / "chelsea.png").convert("RGB")
    sizes = [(64, 48), HANG_SIZE, (80, 60), (72, 54), (88, 66)]
    for i, size in enumerate(sizes):   # pixels only: no profile to carry in a tiny file
        Image.fromarray(np.asarray(base.resize(size))).save(src / f"img{i}.png")
    return src


def _rows(out: Path) -> dict[str, dict]:
    rows = ds.dataset(str(out / "_manifest"), format="parquet").to_table().to_pylist()
    return {Path(r["input_uri"]).name: r for r in rows}


def test_a_hung_encode_is_one_error_row_and_the_job_finishes(hang, photos, tmp_path):
    hang.on = "encode"
    out = tmp_path / "out"
    # shard_size 3: the hung img1 has img2 after it in the same shard
    summary = recompress.run(JobSpec(input=str(photos), output=str(out), codec="test-hang", target_bpp=8.0,
                                     shard_size=3, ms_ssim=False, item_timeout_s=TIMEOUT_S, in_process=True))
    assert hang.entered.is_set(), "the codec really hung"
    assert (out / "_SUCCESS").exists()
    assert summary["items"] == 5 and summary["statuses"] == {"ok": 4, "error": 1}, summary
    rows = _rows(out)
    bad = rows["img1.png"]
    assert bad["status"] == "error"
    assert bad["error"] == f"encode: timed out after {TIMEOUT_S:g} s (--item-timeout)"
    assert bad["width"] == HANG_SIZE[0]   # what it got before it hung is kept
    for name in ("img0.png", "img2.png", "img3.png", "img4.png"):
        assert rows[name]["status"] == "ok", rows[name]
        assert Path(rows[name]["output_uri"]).stat().st_size == rows[name]["output_bytes"]
    assert hang.built == 2, "the items after the hung one ran on a fresh codec"

    # Let the hung encode return: it stops at its next stage boundary and never writes its file.
    hang.release.set()
    assert hang.cancelled.wait(10), "the abandoned item stopped before its next stage"
    assert not (out / "img1.png.hang.rfic").exists()
    assert not list(out.glob("img1*")), "nothing of the hung item was written"
    assert _rows(out)["img1.png"] == bad, "its late result did not replace the error row"


def test_a_hung_decoder_in_a_decompress_job_is_one_error_row(hang, photos, tmp_path):
    out, restored = tmp_path / "out", tmp_path / "restored"
    recompress.run(JobSpec(input=str(photos), output=str(out), codec="test-hang", target_bpp=8.0, shard_size=3,
                           ms_ssim=False, in_process=True))
    hang.on = "decode"
    summary = decompress.run(JobSpec(input=str(out), output=str(restored), kind="decompress", shard_size=3,
                                     item_timeout_s=TIMEOUT_S, in_process=True))
    assert hang.entered.is_set()
    assert summary["statuses"] == {"ok": 4, "error": 1}, summary
    rows = {Path(r["input_uri"]).name: r
            for r in ds.dataset(str(restored / "_manifest"), format="parquet").to_table().to_pylist()}
    bad = rows["img1.png.hang.rfic"]
    assert bad["error"] == f"decode: timed out after {TIMEOUT_S:g} s (--item-timeout)"
    assert sum(r["status"] == "ok" for r in rows.values()) == 4
    hang.release.set()
    assert hang.cancelled.wait(10)
    assert sorted(p.name for p in restored.glob("*.png")) == ["img0.png", "img2.png", "img3.png", "img4.png"]


def test_items_within_the_timeout_are_unaffected_and_errors_still_propagate(tmp_path, samples_dir, monkeypatch):
    from ratefit.codecs.rate import Target
    from ratefit.workers import compress as compress_mod
    from ratefit.workers.compress import CompressConfig, Compressor
    from ratefit.workers.items import Item
    from ratefit.workers.storage import StorageUnavailable

    c = Compressor(CompressConfig(output=str(tmp_path / "out"), codec="jpeg", target=Target("bpp", 1.0),
                                  ms_ssim=False, item_timeout_s=5.0))
    item = Item(uri=str(samples_dir / "chelsea.png"), relpath="chelsea.png")
    row = c(item, 0, 1)
    assert row["status"] == "ok" and not c.poisoned
    worker = c._item_thread.thread
    assert c(item, 0, 1)["status"] == "ok" and c._item_thread.thread is worker, "one thread, reused"
    other = Compressor(c.config)
    assert other(item, 0, 1)["status"] == "ok"
    other_worker = other._item_thread.thread
    del other
    gc.collect()
    other_worker.join(5)
    assert not other_worker.is_alive(), "a processor's thread ends with it"

    def outage(*a, **k):
        raise StorageUnavailable("storage unreachable: test")

    monkeypatch.setattr(compress_mod, "read_image", outage)
    with pytest.raises(StorageUnavailable):   # still raised to the shard, from the worker thread
        c(item, 0, 1)


def test_the_timeout_is_validated_parsed_and_not_hashed(tmp_path):
    base = dict(input=str(tmp_path), output=str(tmp_path / "out"), codec="jpeg", target_bpp=1.0)
    assert JobSpec(**base).item_timeout_s == 600.0
    for bad in (0, -1, math.inf, math.nan, True, "10", None):
        with pytest.raises(SpecError, match="item_timeout_s"):
            JobSpec(**base, item_timeout_s=bad)
    assert JobSpec(**base, item_timeout_s=5).item_timeout_s == 5.0
    assert JobSpec(**base, item_timeout_s=5).spec_hash() == JobSpec(**base).spec_hash()
    budget = dict(base, target_bpp=None, budget_bpp=1.0)
    assert JobSpec(**budget, item_timeout_s=5).spec_hash() == JobSpec(**budget).spec_hash()

    import argparse

    p = argparse.ArgumentParser()
    cli.add_compress_arguments(p)
    spec = cli.spec_from_args(p.parse_args([str(tmp_path), str(tmp_path / "o"), "--codec", "jpeg",
                                            "--target-bpp", "1", "--item-timeout", "2.5"]))
    assert spec.item_timeout_s == 2.5

    from ratefit.jobs.build import build_pass

    assert build_pass(spec, "compress", run_id="r").config.item_timeout_s == 2.5
    assert build_pass(JobSpec(**budget, item_timeout_s=3), "probe").config.item_timeout_s == 3.0
    dspec = JobSpec(input=str(tmp_path), output=str(tmp_path / "o"), kind="decompress", item_timeout_s=4)
    assert build_pass(dspec, "decompress").config.item_timeout_s == 4.0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_under_ray_a_hung_read_replaces_the_actor(ray_session, tmp_path, samples_dir):
    """A real RayPool: the read of a FIFO blocks in the worker process; its shard finishes with
    one error row, and the actor is replaced (the old one is dead, later shards run elsewhere)."""
    from ray.exceptions import RayActorError

    from ratefit.codecs.rate import Target
    from ratefit.jobs.pool import RayPool
    from ratefit.workers.compress import CompressConfig
    from ratefit.workers.items import Item, Shard

    src = tmp_path / "in"
    src.mkdir()
    photo = Image.fromarray(np.asarray(Image.open(samples_dir / "chelsea.png").convert("RGB").resize((64, 48))))
    for i in range(4):
        photo.save(src / f"img{i}.png")
    os.mkfifo(src / "hang.png")
    out = tmp_path / "out"
    config = CompressConfig(output=str(out), codec="jpeg", target=Target("bpp", 8.0), ms_ssim=False,
                            item_timeout_s=2.0)

    def item(name: str) -> Item:
        return Item(uri=str(src / name), relpath=name)

    shards = [Shard(0, (item("img0.png"), item("hang.png"), item("img1.png"))),
              Shard(1, (item("img2.png"),)), Shard(2, (item("img3.png"),))]
    pool = RayPool(config, "cpu", 120.0, workers=1)
    try:
        first = pool._slots[0].actor
        done = {d.shard.index: d for d in pool.run(shards)}
        assert all(d.summary is not None for d in done.values()), done
        assert done[0].summary["replace_actor"] is True
        assert done[0].summary["statuses"] == {"ok": 2, "error": 1}
        assert done[2].summary["replace_actor"] is False, "shard 2 ran on the fresh actor"
        assert done[1].summary["statuses"] == done[2].summary["statuses"] == {"ok": 1}
        assert pool._slots[0].actor is not first
        with pytest.raises(RayActorError):   # the old actor, and the hung thread with it, is gone
            ray_session.get(first.ready.remote(), timeout=30)
        assert pool.retried == 0, "replacing the actor cost no shard a retry"
    finally:
        pool.close()
    rows = {Path(r["input_uri"]).name: r
            for r in ds.dataset(str(out / "_manifest"), format="parquet").to_table().to_pylist()}
    assert rows["hang.png"]["status"] == "error"
    assert rows["hang.png"]["error"] == "read: timed out after 2 s (--item-timeout)"
    assert all(rows[f"img{i}.png"]["status"] == "ok" for i in range(4))
    assert not list(out.glob("hang*")), "the hung item wrote nothing"


def test_the_readme_documents_the_flag():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "--item-timeout" in text
    assert processor_mod.DEFAULT_ITEM_TIMEOUT_S == 600.0
