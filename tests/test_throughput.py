"""The learned codec's CPU path (issue 21): what makes it faster must not change what it promises.

Float32 rate estimates stay close to the float64 coder's price; a warm-started search lands in
the same window as a cold one with fewer estimates; ``reconstruct`` after an encode (the
metrics' picture) is the decoder's picture bit for bit; a batched analysis gives the latents
of one image at a time; reading ahead hands every item its own read (or its own error) with
bounded memory; and a job that batches and reads ahead writes rows as good as one that does not.
The speed itself is measured by ``ratefit bench`` (docs/benchmarks.md), never here.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ratefit.codecs.base import CodecError
from ratefit.codecs.gain_hyperprior import GainHyperpriorCodec
from ratefit.codecs.rate import RATE_TOLERANCE, Target, search
from ratefit.workers.actor import ShardWorker
from ratefit.workers.compress import CompressConfig
from ratefit.workers.items import Item, Shard
from ratefit.workers.readahead import ReadAhead


@pytest.fixture(scope="module")
def codec() -> GainHyperpriorCodec:
    return GainHyperpriorCodec(device="cpu")   # the bundled weights: real rate curves


@pytest.fixture(scope="module")
def crops(samples_dir) -> list[np.ndarray]:
    """Three 256x192 crops of one photo (alike, as neighbours in a collection are) and one other."""
    cat = np.asarray(Image.open(samples_dir / "chelsea.png").convert("RGB"))
    other = np.asarray(Image.open(samples_dir / "coffee.png").convert("RGB"))
    return [cat[0:192, 0:256].copy(), cat[40:232, 60:316].copy(), cat[100:292, 120:376].copy(),
            other[0:192, 0:256].copy()]


def test_float32_estimates_stay_within_half_a_percent_of_the_coders_price(codec, crops):
    for image in crops:
        prepared = codec.prepare(image)
        for v in (-2.0, 1.5, 5.0):
            fast = codec.estimate(prepared, v)
            with torch.inference_mode():
                exact = codec.model.estimate_bits(prepared.y, v, exact=True) + 32
            assert abs(fast - exact) / exact < 0.005, (v, fast, exact)


def test_a_warm_start_lands_in_the_window_with_fewer_estimates(codec, crops):
    target, overhead = Target("bpp", 0.5), 40
    ceiling = target.max_bytes(256 * 192) - overhead
    first = search(codec, codec.prepare(crops[0]), crops[0], target, overhead)
    cold_total = warm_total = 0
    for image in crops[1:3]:
        prepared = codec.prepare(image)
        cold = search(codec, prepared, image, target, overhead)
        warm = search(codec, prepared, image, target, overhead, start=first.value)
        for out in (cold, warm):
            assert out.status == "ok"
            assert ceiling * (1 - RATE_TOLERANCE) <= len(out.payload) <= ceiling
        cold_total, warm_total = cold_total + cold.estimates, warm_total + warm.estimates
    assert warm_total < cold_total, (warm_total, cold_total)
    # A start far from the answer costs estimates, never the ceiling.
    for start in (codec.control.low, codec.control.high):
        out = search(codec, codec.prepare(crops[3]), crops[3], target, overhead, start=start)
        assert out.status == "ok" and ceiling * (1 - RATE_TOLERANCE) <= len(out.payload) <= ceiling


def test_reconstruct_after_an_encode_is_the_decoders_picture(codec, crops):
    image = crops[3]
    prepared = codec.prepare(image)
    payload = codec.encode(prepared, 2.25)
    assert prepared.coded is not None and prepared.coded[0] == 2.25   # the encode's own latent is kept
    decoded = codec.decode(payload, 256, 192, 2.25)
    assert np.array_equal(codec.reconstruct(prepared, 2.25), decoded)
    # At a value it did not encode, reconstruct takes the full path, and still matches.
    assert np.array_equal(codec.reconstruct(prepared, 4.0), codec.decode(codec.encode(prepared, 4.0), 256, 192, 4.0))


def test_a_batched_analysis_gives_each_images_own_latents(codec, crops):
    singles = [codec.prepare(image) for image in crops]
    batched = codec.prepare_batch(crops)
    for one, many, image in zip(singles, batched, crops):
        assert (many.width, many.height) == (256, 192)
        assert torch.allclose(one.y, many.y, rtol=1e-4, atol=1e-4)   # a batched convolution sums in its own order
        payload = codec.encode(many, 3.0)
        assert np.array_equal(codec.decode(payload, 256, 192, 3.0), codec.reconstruct(many, 3.0))
    with pytest.raises(CodecError, match="one padded size"):
        codec.prepare_batch([crops[0], crops[0][:100]])


def test_read_ahead_gives_each_item_its_read_and_stays_bounded():
    items = [Item(uri=f"mem://{i}", relpath=f"{i}.png") for i in range(10)]
    started: list[int] = []
    lock = threading.Lock()

    def read(item: Item) -> int:
        i = int(item.relpath.split(".")[0])
        with lock:
            started.append(i)
        if i == 4:
            raise OSError("unreadable")   # the read's own error, handed to its item
        return i * i

    ahead = ReadAhead(lambda item: _outcome(read, item), items, depth=2)
    try:
        ok, first = ahead.take(items[0])
        assert ok and first == (0, None)
        time.sleep(0.2)
        assert max(started) <= 2, started   # the item taken plus two ahead, no more
        got = [ahead.take(item)[1] for item in items[1:]]
        assert [g[0] for g in got] == [i * i if i != 4 else None for i in range(1, 10)]
        assert isinstance(got[3][1], OSError)
        assert ahead.take(items[0]) == (False, None), "an item taken twice is read by its caller"
        assert ahead.take(Item(uri="mem://x", relpath="x.png")) == (False, None)
    finally:
        ahead.close()


def _outcome(read, item):
    try:
        return read(item), None
    except Exception as e:
        return None, e


def _rows(folder: Path, out: Path, batch: int) -> list[dict]:
    names = sorted(p.name for p in folder.iterdir())
    items = [Item(uri=str(folder / n), relpath=n) for n in names]
    config = CompressConfig(output=str(out), codec="gain-hyperprior", codec_options={"device": "cpu"},
                            target=Target("bpp", 0.6), verify=True, ms_ssim=False, batch=batch)
    worker = ShardWorker(config)
    assert worker.processor.batch == batch
    worker.process(Shard(index=0, items=items))
    from ratefit.workers.manifest import committed_rows

    return sorted(committed_rows(worker.processor.out_fs, worker.manifest_root, 0), key=lambda r: r["input_uri"])


def test_a_shard_coded_in_batches_writes_rows_as_good_as_one_by_one(crops, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(crops):
        Image.fromarray(image).save(folder / f"a{i}.png")
    Image.fromarray(crops[0][:150]).save(folder / "b-other-size.png")   # breaks a batch: coded alone
    (folder / "c-broken.png").write_bytes(b"\x89PNG not really")      # its own error row, nothing else
    Image.fromarray(crops[1]).save(folder / "d.png")
    one = _rows(folder, tmp_path / "one", batch=1)
    many = _rows(folder, tmp_path / "many", batch=3)
    for a, b in zip(one, many):
        assert a["status"] == b["status"], (a["input_uri"], a["error"], b["error"])
        if a["status"] == "ok":
            assert b["verified"] and b["analysis_ms"] > 0
            assert abs(a["psnr"] - b["psnr"]) < 0.05 and abs(a["bpp"] - b["bpp"]) / a["bpp"] < 0.01
    assert [r["status"] for r in many].count("ok") == 6
    shares = {r["analysis_ms"] for r in many[:3]}
    assert len(shares) == 1, "a0-a2 went through the analysis as one batch (each row gets its share)"
    assert len({r["analysis_ms"] for r in one[:3]}) == 3
    broken = next(r for r in many if r["input_uri"].endswith("c-broken.png"))
    assert broken["status"] == "error" and broken["error"].startswith("decode")
