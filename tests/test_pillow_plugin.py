"""``ratefit.codecs.pillow_plugin``: ``PIL.Image.open`` on ratefit's outputs gives what
``ratefit decompress`` writes.

Containers are made the way a compress job makes them (``workers.compress.Compressor``, in
process), or, for the legacy classical containers no job writes any more, with
``container.pack`` as older ratefit did. Small images keep the file quick on a CPU.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, UnidentifiedImageError

import ratefit.codecs.pillow_plugin as plugin
from ratefit.codecs import container
from ratefit.codecs.base import Extras, payload_weights_sha256
from ratefit.codecs.metrics import psnr
from ratefit.codecs.rate import Target, search
from ratefit.codecs.registry import get_codec

SIZE = (192, 128)
ARTIST = 0x013B
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>A. Photographer</dc:creator>'
       b'</rdf:Description></rdf:RDF></x:xmpmeta>')
PLAIN_FORMATS = {"avif": "AVIF", "webp": "WEBP", "jpeg": "JPEG", "jxl": "JXL"}


@pytest.fixture(autouse=True)
def _fresh_registry():
    plugin.clear_weights()
    yield
    plugin.clear_weights()


@pytest.fixture(scope="module")
def photos(samples_dir, tmp_path_factory) -> Path:
    """Two small RGB PNGs without metadata."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea.png", "coffee.png"):
        with Image.open(samples_dir / name) as im:
            Image.fromarray(np.asarray(im.convert("RGB").resize(SIZE))).save(folder / name)   # no ICC, no XMP
    return folder


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _compress(folder: Path, out: Path, codec: str, bpp: float = 1.0, **codec_options) -> dict[str, dict]:
    """A compress job's rows, run in process: input name -> row (``output_uri`` a local path)."""
    from ratefit.workers.compress import CompressConfig, Compressor
    from ratefit.workers.items import Item

    c = Compressor(CompressConfig(output=str(out), codec=codec, codec_options=codec_options,
                                  target=Target("bpp", bpp), ms_ssim=False, item_timeout_s=None))
    rows = {}
    for path in sorted(folder.iterdir()):
        row = c(Item(uri=str(path), relpath=path.name), 0, 1)
        assert row["status"] == "ok", row["error"]
        rows[path.name] = row
    return rows


@pytest.fixture(scope="module")
def ghp(photos, tmp_path_factory) -> dict[str, dict]:
    return _compress(photos, tmp_path_factory.mktemp("ghp"), "gain-hyperprior")


def _restored_png(rfic: Path, out: Path) -> Path:
    """What ``ratefit decompress`` writes for one container (its Decompressor, in process)."""
    from ratefit.workers.decompress import DecompressConfig, Decompressor, restored_relpath
    from ratefit.workers.items import Item

    d = Decompressor(DecompressConfig(output=str(out), item_timeout_s=None))
    row = d(Item(uri=str(rfic), relpath=rfic.name), 0, 1)
    assert row["status"] == "ok", row["error"]
    return out / restored_relpath(rfic.name)


# ------------------------------------------------------------------------ pixels equal the manifest's

def test_gain_hyperprior_containers_open_with_the_rows_psnr(photos, ghp):
    for name, row in ghp.items():
        out = Path(row["output_uri"])
        assert out.name.endswith(".ghp.rfic")
        with Image.open(out) as im:
            assert (im.format, im.mode, im.size) == ("RFIC", "RGB", SIZE)
            assert im.info["ratefit_codec"] == "gain-hyperprior"
            assert im.info["ratefit_value"] == row["rate_param"]
            assert "icc_profile" not in im.info and "exif" not in im.info
            decoded = np.asarray(im)
        assert decoded.shape == (SIZE[1], SIZE[0], 3) and decoded.dtype == np.uint8
        assert psnr(_pixels(photos / name), decoded) == pytest.approx(row["psnr"], abs=1e-6)


@pytest.mark.parametrize("codec", sorted(PLAIN_FORMATS))
def test_plain_outputs_open_with_the_rows_psnr(photos, tmp_path, codec):
    for name, row in _compress(photos, tmp_path, codec).items():
        out = Path(row["output_uri"])
        assert not out.read_bytes().startswith(container.MAGIC)
        with Image.open(out) as im:
            assert im.format == PLAIN_FORMATS[codec]
            decoded = np.asarray(im.convert("RGB"))
        assert psnr(_pixels(photos / name), decoded) == pytest.approx(row["psnr"], abs=1e-6)


def _v1(codec: str, payload: bytes, value: float, width: int, height: int) -> bytes:
    """A container as version 1 wrote it (no sections; the CRC covers the payload only)."""
    name = codec.encode()
    return b"".join([struct.pack("<4sBB", container.MAGIC, 1, 0), bytes([len(name)]), name, bytes([0]),
                     struct.pack("<dII", value, width, height), bytes([3]), b"RGB",
                     struct.pack("<II", len(payload), zlib.crc32(payload)), payload])


@pytest.mark.parametrize("codec", ["jpeg", "webp", "avif"])
def test_legacy_classical_containers_open(photos, tmp_path, codec):
    """Classical results written before plain files: a jpeg/webp/avif payload in a container."""
    c = get_codec(codec)
    for i, path in enumerate(sorted(photos.iterdir())):
        image = _pixels(path)
        h, w = image.shape[:2]
        outcome = search(c, c.prepare(image), image, Target("bpp", 1.0), container.header_size(codec))
        expected = psnr(image, c.decode(outcome.payload, w, h, outcome.value))   # what the row said
        blob = (container.pack(codec, outcome.payload, value=outcome.value, width=w, height=h) if i == 0
                else _v1(codec, outcome.payload, outcome.value, w, h))
        rfic = tmp_path / f"{path.name}.{c.extension}.rfic"
        rfic.write_bytes(blob)
        with Image.open(rfic) as im:
            assert (im.format, im.mode, im.info["ratefit_container_version"]) == ("RFIC", "RGB", 2 if i == 0 else 1)
            assert psnr(image, np.asarray(im)) == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------ paths, file objects, decompress

def test_path_and_file_object_give_what_decompress_writes(ghp, tmp_path):
    rfic = Path(ghp["chelsea.png"]["output_uri"])
    with Image.open(rfic) as im:
        from_path = np.asarray(im)
        assert im.fp is None   # loaded: the file is closed, as Pillow does
    with Image.open(io.BytesIO(rfic.read_bytes())) as im:
        from_stream = np.asarray(im)
    with rfic.open("rb") as f:
        from_file = np.asarray(Image.open(f).convert("RGB"))
    assert np.array_equal(from_path, from_stream) and np.array_equal(from_path, from_file)
    assert np.array_equal(from_path, _pixels(_restored_png(rfic, tmp_path / "restored")))
    header, payload = container.unpack(rfic.read_bytes())
    direct = get_codec("gain-hyperprior").decode(payload, header.width, header.height, header.value)
    assert np.array_equal(from_path, direct)

    with Image.open(rfic) as im:   # the usual Pillow calls work on it
        im.save(tmp_path / "copy.png")
        im.thumbnail((64, 64))
        assert max(im.size) == 64
    assert np.array_equal(_pixels(tmp_path / "copy.png"), from_path)


# ------------------------------------------------------------------------ alpha and metadata

def test_alpha_icc_exif_and_xmp(samples_dir, tmp_path, wide_gamut_icc):
    folder = tmp_path / "in"
    folder.mkdir()
    with Image.open(samples_dir / "coffee.png") as im:
        rgb = im.convert("RGB").resize(SIZE)
    yy, xx = np.mgrid[0:SIZE[1], 0:SIZE[0]]
    alpha = np.where((xx - 96) ** 2 + (yy - 64) ** 2 < 40 ** 2, 255, (xx + 2 * yy) % 256).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([np.asarray(rgb), alpha]))
    exif = Image.Exif()
    exif[ARTIST] = "A. Photographer"
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    rgba.save(folder / "cut.png", icc_profile=wide_gamut_icc, exif=exif.tobytes(), pnginfo=info)

    row = _compress(folder, tmp_path / "out", "gain-hyperprior", bpp=3.0)["cut.png"]
    assert row["has_alpha"] and row["has_icc"] and row["exif_bytes"] > 0 and row["xmp_bytes"] > 0
    rfic = Path(row["output_uri"])
    with Image.open(rfic) as im:
        assert im.mode == "RGBA" and im.info["ratefit_original_mode"] == "RGBA"
        assert im.info["icc_profile"] == wide_gamut_icc
        assert im.getexif().get(ARTIST) == "A. Photographer"
        assert im.info["xmp"] == XMP
        decoded = np.asarray(im)
    assert decoded.shape == (SIZE[1], SIZE[0], 4)
    assert np.array_equal(decoded[..., 3], alpha)                           # alpha exact
    assert psnr(np.asarray(rgb), np.ascontiguousarray(decoded[..., :3])) == pytest.approx(row["psnr"], abs=1e-6)
    with Image.open(_restored_png(rfic, tmp_path / "restored")) as png:
        assert png.mode == "RGBA" and np.array_equal(np.asarray(png), decoded)
        assert png.info["icc_profile"] == wide_gamut_icc and png.getexif().get(ARTIST) == "A. Photographer"
    with Image.open(rfic) as im:
        assert im.convert("RGB").mode == "RGB"


# ------------------------------------------------------------------------ weights

def test_other_weights_must_be_registered(photos, tmp_path):
    from ratefit.codecs.gain_hyperprior import BUNDLED_WEIGHTS
    from ratefit.codecs.weights import WeightsFile, bundled_weights, parse_weights, weights_bytes

    tensors, config, bundled_sha, meta = parse_weights(bundled_weights(BUNDLED_WEIGHTS))
    extra = {k: v for k, v in meta.items() if k not in ("format", "config")}
    other = weights_bytes(tensors, config, {**extra, "note": "re-saved for the pillow plugin test"})
    sha = hashlib.sha256(other).hexdigest()
    assert sha != bundled_sha.hex()
    rows = _compress(photos, tmp_path / "out", "gain-hyperprior", weights=WeightsFile(other, "re-saved"))
    row = rows["coffee.png"]
    rfic = Path(row["output_uri"])
    assert container.unpack(rfic.read_bytes())[0].weights_sha256.hex() == sha

    with Image.open(rfic) as im:   # the header opens; the pixels need the weights
        assert im.size == SIZE and im.info["ratefit_weights_sha256"] == sha
        with pytest.raises(plugin.WeightsUnavailable, match=sha) as e:
            im.load()
    assert "gain-hyperprior" in str(e.value) and "ratefit.codecs.pillow_plugin.register_weights" in str(e.value)
    assert isinstance(e.value, ValueError)

    weights_file = tmp_path / "other.safetensors"
    weights_file.write_bytes(other)
    plugin.register_weights("gain-hyperprior", str(weights_file))
    with Image.open(rfic) as im:
        assert psnr(_pixels(photos / "coffee.png"), np.asarray(im)) == pytest.approx(row["psnr"], abs=1e-6)
    with Image.open(Path(rows["chelsea.png"]["output_uri"])) as im:   # one codec per weights: reused
        im.load()
    assert len(plugin._CODECS) == 1

    plugin.clear_weights()
    plugin.register_weights("gain-hyperprior", other)   # bytes work as well
    with Image.open(rfic) as im:
        assert psnr(_pixels(photos / "coffee.png"), np.asarray(im)) == pytest.approx(row["psnr"], abs=1e-6)
    with pytest.raises(ValueError, match="takes no weights"):
        plugin.register_weights("jpeg", other)


def test_zoo_containers_with_registered_checkpoints(samples_dir, tmp_path):
    """CompressAI zoo codecs: a folder of zoo-style checkpoints (tiny random networks), found by SHA."""
    import torch
    from compressai import models

    from ratefit.workers.codec_loader import load_codec

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for q in (1, 3):
        torch.manual_seed(q)
        model = models.ScaleHyperprior(16, 24)
        with torch.no_grad():
            model.g_a[6].weight.mul_(20.0 * q)
            model.g_a[6].bias.mul_(20.0 * q)
        model.update(force=True)
        torch.save(model.state_dict(), folder / f"bmshj2018-hyperprior-{q}-0000{q}aaa.pth.tar")
    name = "compressai:bmshj2018-hyperprior"
    codec = load_codec(name, weights=str(folder), device="cpu")
    image = np.asarray(Image.open(samples_dir / "chelsea.png").convert("RGB").resize((96, 64)))
    payload = codec.encode(codec.prepare(image), 1.5)   # the second network (quality 3)
    assert payload[0] == 3
    blob = container.pack(name, payload, value=1.5, width=96, height=64,
                          weights_sha256=payload_weights_sha256(codec, payload))
    with pytest.raises(plugin.WeightsUnavailable, match=payload_weights_sha256(codec, payload).hex()):
        Image.open(io.BytesIO(blob)).load()
    plugin.register_weights(name, str(folder))
    with Image.open(io.BytesIO(blob)) as im:
        assert np.array_equal(np.asarray(im), codec.decode(payload, 96, 64, 1.5))


# ------------------------------------------------------------------------ corrupt and hostile files

def test_corrupt_containers_raise_clear_errors(ghp, tmp_path, monkeypatch):
    # ratefit's own reader switches Pillow's bomb check off process-wide (workers/read.py); a
    # program using the plugin has Pillow's default
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    good = Path(ghp["chelsea.png"]["output_uri"]).read_bytes()
    for data, message in [(good[:-7], "truncated"), (good[:20], "truncated header"),
                          (good[:-3] + bytes([good[-3] ^ 1]) + good[-2:], "checksum"),
                          (good[:4] + b"\x09" + good[5:], "unsupported container version")]:
        with pytest.raises(container.ContainerError, match=message):
            Image.open(io.BytesIO(data))
    path = tmp_path / "cut.rfic"
    path.write_bytes(good[:-7])
    with pytest.raises(ValueError, match="cut.rfic"):
        Image.open(path)
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(b"RFI"))

    header, _ = container.unpack(good)
    short = container.pack("gain-hyperprior", b"\x01", value=header.value, width=header.width,
                           height=header.height, weights_sha256=header.weights_sha256)
    with Image.open(io.BytesIO(short)) as im, pytest.raises(plugin.RficError, match="does not decode"):
        im.load()
    unknown = container.pack("no-such-codec", b"payload", value=1.0, width=8, height=8)
    with Image.open(io.BytesIO(unknown)) as im, pytest.raises(plugin.RficError, match="unknown codec"):
        im.load()
    bomb = container.pack("gain-hyperprior", b"payload", value=1.0, width=60000, height=60000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), "gray").save(jpeg, "JPEG")
    misfit = container.pack("jpeg", jpeg.getvalue(), value=75, width=8, height=8,   # alpha of another size
                            sections=container.sections_of(Extras(alpha=np.zeros((5, 5), np.uint8))))
    with Image.open(io.BytesIO(misfit)) as im:
        assert im.mode == "RGBA"
        with pytest.raises(plugin.RficError, match="alpha section"):
            im.load()
