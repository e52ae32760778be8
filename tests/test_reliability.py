"""Worker-level reliability: --verify, storage retries, tiles for large images, and an
out-of-memory item retried alone. Faults are injected into the real Compressor and codecs
(a corrupting store, a decoder that disagrees, an allocation failure); the job-level faults
(killed processes, a stopped S3 server) are in test_faults.py."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ratefit.codecs import container
from ratefit.codecs.rate import Target
from ratefit.codecs.registry import get_codec
from ratefit.workers import layout as layout_mod
from ratefit.workers.compress import CompressConfig, Compressor
from ratefit.workers.items import Item
from ratefit.workers.storage import StorageUnavailable, is_transient, with_retries


def _item(samples_dir: Path, name: str = "chelsea.png") -> Item:
    return Item(uri=str(samples_dir / name), relpath=name)


def _compressor(tmp_path: Path, codec: str, **kw) -> Compressor:
    return Compressor(CompressConfig(output=str(tmp_path / "out"), codec=codec, target=Target("bpp", 0.5),
                                     ms_ssim=False, **kw))


# --------------------------------------------------------------------------- --verify

@pytest.mark.parametrize("codec", ["gain-hyperprior", "webp"])
def test_verify_passes_for_good_bitstreams(tmp_path, samples_dir, codec):
    c = _compressor(tmp_path, codec, verify=True, codec_options={"device": "cpu"} if codec != "webp" else {})
    row = c(_item(samples_dir), 0, 1)
    assert row["status"] == "ok" and row["verified"] is True, row["error"]
    assert Path(row["output_uri"]).stat().st_size == row["output_bytes"]


def test_verify_catches_a_store_that_corrupts_what_it_keeps(tmp_path, samples_dir, monkeypatch):
    real_write = layout_mod.atomic_write

    def corrupting_write(fs, path, data):
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0x10
        real_write(fs, path, bytes(bad))

    monkeypatch.setattr(layout_mod, "atomic_write", corrupting_write)
    c = _compressor(tmp_path, "jpeg", verify=True)
    row = c(_item(samples_dir), 0, 1)
    assert row["status"] == "error" and row["verified"] is False
    assert row["error"].startswith("verify: stored file is") and "differs" in row["error"]
    assert row["output_uri"] is None
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()], "a file that failed verification must be removed"


def test_without_verify_the_same_corruption_goes_unnoticed(tmp_path, samples_dir, monkeypatch):
    """The control for the test above: only --verify reads the stored file back."""
    real_write = layout_mod.atomic_write
    monkeypatch.setattr(layout_mod, "atomic_write",
                        lambda fs, path, data: real_write(fs, path, data[:-1] + bytes([data[-1] ^ 1])))
    row = _compressor(tmp_path, "jpeg")(_item(samples_dir), 0, 1)
    assert row["status"] == "ok" and row["verified"] is None


def test_verify_catches_a_decoder_that_disagrees_with_the_encoder(tmp_path, samples_dir):
    c = _compressor(tmp_path, "gain-hyperprior", verify=True, codec_options={"device": "cpu"})
    real_decode = c.codec.decode

    def drifting_decode(payload, width, height, value):
        out = real_decode(payload, width, height, value).copy()
        out[0, 0, 0] ^= 1     # one sample one level off: what a cross-device index flip looks like
        return out

    c.codec.decode = drifting_decode
    row = c(_item(samples_dir), 0, 1)
    assert row["status"] == "error"
    assert "differs from the encoder's reconstruction in 1 samples (max 1 levels)" in row["error"]
    assert not list((tmp_path / "out").rglob("*.rfic"))


# ------------------------------------------------------------------------ retries

def test_retries_carry_a_short_outage(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "connection refused")
        return b"data"

    assert with_retries(flaky, "read x") == b"data"
    assert len(calls) == 4


def test_retries_give_up_after_the_window_with_a_clear_error():
    def down():
        raise TimeoutError("no answer")

    with pytest.raises(StorageUnavailable, match=r"read s3://b/k: storage unreachable for \d+ s \(TimeoutError"):
        with_retries(down, "read s3://b/k", window_s=0.6)


def test_wrong_requests_are_not_retried():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/nope")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, "read")
    assert len(calls) == 1


def test_transient_classification():
    class EndpointConnectionError(Exception):   # botocore's name, matched without importing it
        pass

    assert is_transient(EndpointConnectionError("Could not connect"))
    assert is_transient(OSError(errno.ECONNRESET, "reset"))
    wrapped = OSError("wrapped")
    wrapped.__cause__ = ConnectionResetError()
    assert is_transient(wrapped)
    assert not is_transient(OSError(errno.EINVAL, "The specified bucket is not valid."))
    assert not is_transient(PermissionError("denied"))
    assert not is_transient(ValueError("bad"))


def _s3_error(code: str, status: int) -> OSError:
    """What s3fs raises for an S3 error answer: its OSError with botocore's ClientError as cause."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(ClientError({"Error": {"Code": code, "Message": "m"},
                                             "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))


def test_s3_answers_that_say_try_again_are_transient():
    # A restarting SeaweedFS answers 500 InternalError until its volume server registers (seen
    # in CI: one item became an error row); AWS documents 5xx and SlowDown as retryable.
    for code, status in [("InternalError", 500), ("BadGateway", 502), ("SlowDown", 503), ("GatewayTimeout", 504)]:
        assert is_transient(_s3_error(code, status)), code
    for code, status in [("NoSuchKey", 404), ("AccessDenied", 403), ("InvalidRange", 416), ("NoSuchBucket", 404)]:
        assert not is_transient(_s3_error(code, status)), code


# ------------------------------------------------------------------- tiles and memory

def test_tiled_transforms_match_the_whole_image(samples_dir):
    img = np.asarray(Image.open(samples_dir / "astronaut.png").convert("RGB"))[:, :400]   # 512x400: 4x4 tiles
    whole = get_codec("gain-hyperprior", device="cpu", tile=0)
    tiled = get_codec("gain-hyperprior", device="cpu", tile=128)
    pw, pt = whole.prepare(img), tiled.prepare(img)
    assert torch.allclose(pw.y, pt.y, atol=1e-4), "the halo must make tiles see what the whole image sees"
    for v in (1.0, 5.0):
        payload = tiled.encode(pt, v)
        decoded = tiled.decode(payload, 400, 512, v)
        assert np.array_equal(decoded, tiled.reconstruct(pt, v)), "decoder and encoder tile alike: bit-exact"
        untiled = whole.decode(payload, 400, 512, v)
        assert np.abs(decoded.astype(int) - untiled.astype(int)).max() <= 2


def test_tile_option_is_checked():
    with pytest.raises(Exception, match="multiple of 64"):
        get_codec("gain-hyperprior", device="cpu", tile=100)


def test_out_of_memory_item_is_retried_alone_with_smaller_tiles(tmp_path, samples_dir):
    c = _compressor(tmp_path, "gain-hyperprior", codec_options={"device": "cpu"})
    real_prepare = c.codec.prepare
    tiles_tried = []

    def prepare_needing_small_tiles(image):
        tiles_tried.append(c.codec.tile)
        if c.codec.tile > 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_prepare(image)

    c.codec.prepare = prepare_needing_small_tiles
    row = c(_item(samples_dir, "astronaut.png"), 0, 1)
    assert row["status"] == "ok", row["error"]
    assert tiles_tried == [1024, 512, 256]
    assert c.codec.tile == 1024, "the worker goes back to its tile size for the next item"
    assert c(_item(samples_dir, "chelsea.png"), 0, 1)["status"] == "ok"


def test_out_of_memory_that_persists_is_one_error_row(tmp_path, samples_dir):
    c = _compressor(tmp_path, "gain-hyperprior", codec_options={"device": "cpu"})

    def always_oom(image):
        raise torch.OutOfMemoryError("CUDA out of memory")

    c.codec.prepare = always_oom
    row = c(_item(samples_dir), 0, 1)
    assert row["status"] == "error" and row["error"].startswith("encode: OutOfMemoryError")
    assert c.codec.tile == 1024


def test_budget_probes_retry_an_out_of_memory_item_with_smaller_tiles(tmp_path, samples_dir):
    from ratefit.workers.probe import ProbeConfig, Prober

    p = Prober(ProbeConfig(output=str(tmp_path / "out"), codec="gain-hyperprior", codec_options={"device": "cpu"},
                           probes=3))
    real_reconstruct, tiles_tried = p.codec.reconstruct, []

    def reconstruct_needing_small_tiles(prepared, value):
        tiles_tried.append(p.codec.tile)
        if p.codec.tile > 512:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_reconstruct(prepared, value)

    p.codec.reconstruct = reconstruct_needing_small_tiles
    row = p(_item(samples_dir), 0, 1)
    assert row["status"] == "ok", row["error"]
    assert list(row["probe_value"]) == p.values and len(p.values) == 3 + 2   # the sweep's 3 plus the range's ends
    assert tiles_tried[:2] == [1024, 512] and set(tiles_tried[2:]) == {512}
    assert p.codec.tile == 1024


def test_decompress_retries_an_out_of_memory_item_with_smaller_tiles(tmp_path, samples_dir):
    from ratefit.workers.decompress import DecompressConfig, Decompressor

    row = _compressor(tmp_path, "gain-hyperprior", codec_options={"device": "cpu"})(_item(samples_dir), 0, 1)
    d = Decompressor(DecompressConfig(output=str(tmp_path / "restored"), codec_options={"gain-hyperprior": {"device": "cpu"}}))
    codec = d.codec_for(container.unpack(Path(row["output_uri"]).read_bytes())[0])
    real_decode, tiles_tried = codec.decode, []

    def decode_needing_small_tiles(*args):
        tiles_tried.append(codec.tile)
        if codec.tile > 256:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_decode(*args)

    codec.decode = decode_needing_small_tiles
    out = d(Item(uri=row["output_uri"], relpath="chelsea.png.ghp.rfic"), 0, 1)
    assert out["status"] == "ok", out["error"]
    assert tiles_tried == [1024, 512, 256] and codec.tile == 1024


@pytest.mark.gpu
def test_a_real_gpu_out_of_memory_is_retried_with_smaller_tiles(tmp_path, samples_dir):
    """On a GPU capped to 2 GiB, a 4096x4096 image does not fit through the transforms whole
    (tile 4096) but does through smaller tiles: the item ends ok and the worker keeps its
    tile size."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (owed to a session with a GPU)")
    big = tmp_path / "big.png"
    Image.open(samples_dir / "astronaut.png").convert("RGB").resize((4096, 4096)).save(big)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2 * 2**30 / total))
    try:
        c = _compressor(tmp_path, "gain-hyperprior", codec_options={"device": "cuda", "tile": 4096})
        real_prepare, tiles_seen = c.codec.prepare, []

        def recording_prepare(image):
            tiles_seen.append(c.codec.tile)
            return real_prepare(image)

        c.codec.prepare = recording_prepare
        row = c(Item(uri=str(big), relpath="big.png"), 0, 1)
        assert row["status"] in ("ok", "unreachable"), row["error"]
        assert tiles_seen[0] == 4096 and len(tiles_seen) > 1, f"no out-of-memory at 2 GiB: tiles {tiles_seen}"
        assert c.codec.tile == 4096
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_hyper_synthesis_over_tiles_matches_the_whole_latent(samples_dir):
    """A strip wider than 2048 px: h_s runs over z tiles; scale indexes must be the ones the
    whole-latent float64 pass gives, or encoder and decoder would disagree with old streams."""
    from ratefit.codecs import gained

    strip = np.asarray(Image.open(samples_dir / "astronaut.png").convert("RGB").resize((2240, 128)))
    codec = get_codec("gain-hyperprior", device="cpu")
    model, prepared = codec.model, codec.prepare(strip)
    z_hat = model._quantize_z(model._hyper(prepared.y, 4.0)[1])[1]
    assert z_hat.shape[-1] > gained.HYPER_TILE
    tiled_idx, tiled_means, _ = model._entropy_params(z_hat, 4.0)
    whole = gained.HYPER_TILE
    try:
        gained.HYPER_TILE = 0
        whole_idx, whole_means, _ = model._entropy_params(z_hat, 4.0)
    finally:
        gained.HYPER_TILE = whole
    assert torch.equal(tiled_idx, whole_idx)
    assert torch.allclose(tiled_means, whole_means, rtol=0, atol=1e-9)
    payload = codec.encode(prepared, 4.0)
    assert np.array_equal(codec.decode(payload, 2240, 128, 4.0), codec.reconstruct(prepared, 4.0))


_BIG_JOB = """
import resource, sys
from ratefit.codecs.rate import Target
from ratefit.workers.compress import CompressConfig, Compressor
from ratefit.workers.items import Item
tile = int(sys.argv[2])
c = Compressor(CompressConfig(output=sys.argv[3], codec="gain-hyperprior", target=Target("bpp", 0.5),
                              codec_options={"device": "cpu", "tile": tile}, ms_ssim=False, verify=True))
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
row = c(Item(uri=sys.argv[1], relpath="big.png"), 0, 1)
print(row["status"], row["error"], row["width"], row["height"], row["bpp"], loaded,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
def test_a_12_megapixel_photo_compresses_with_bounded_memory(tmp_path, samples_dir):
    """4000x3000 from the sample photos, through the learned codec with --verify, in a fresh
    process whose memory is measured over what the loaded codec already holds. With 1024 px
    tiles it peaked at 2.3 GB on the 2-core development machine (2026-11-27), about 1.3 GB over
    the loaded codec; with tiles off (tile 0) at 7.5 GB (6.5 GB over), which the 2.2 GB bound
    guards against."""
    check_big_photo_compresses_with_bounded_memory(tmp_path, samples_dir, 4000, 3000, tile=1024, bound_mb=2200)


def test_a_3_megapixel_photo_compresses_with_bounded_memory(tmp_path, samples_dir):
    """The 12 MP run's sibling in ``make test``: 2000x1500 over 512 px tiles (the same number of
    tiles across), the same assertions. On the 2-core machine (2026-12-03) the item took 0.54 GB
    over the 1.04 GB of the loaded codec with 512 px tiles and 1.95 GB with tiles off, which the
    1.1 GB bound guards against. (The whole peak was 1.7 GB here and 2.5 GB in CI: the fixed part
    differs between machines, so the bound holds the item's own growth.)"""
    check_big_photo_compresses_with_bounded_memory(tmp_path, samples_dir, 2000, 1500, tile=512, bound_mb=1100)


def check_big_photo_compresses_with_bounded_memory(tmp_path, samples_dir, width: int, height: int, tile: int,
                                                   bound_mb: int) -> None:
    import subprocess
    import sys

    mosaic = Image.new("RGB", (width, height))
    half = (width // 2, height // 2)
    for k, name in enumerate(["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]):
        mosaic.paste(Image.open(samples_dir / name).convert("RGB").resize(half), ((k % 2) * half[0], (k // 2) * half[1]))
    src = tmp_path / "mosaic.png"
    mosaic.save(src)
    out = subprocess.run([sys.executable, "-c", _BIG_JOB, str(src), str(tile), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    status, error, w, h, bpp, loaded_mb, peak_mb = out.stdout.split()[-7:]
    assert status == "ok" and (w, h) == (str(width), str(height)) and float(bpp) <= 0.5, out.stdout
    # What the item itself took, over the process with its libraries and codec loaded: that fixed
    # part differs between machines (the same test peaked 1.7 GB here and 2.5 GB in CI).
    grew = int(peak_mb) - int(loaded_mb)
    assert grew < bound_mb, f"the item took {grew} MB over the {loaded_mb} MB of the loaded codec"
