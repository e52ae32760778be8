"""The plain-file codecs (jpeg, webp, avif, jxl, jxl-lossless), codec side.

Each writes a standard file that plain Pillow opens (JPEG XL after ``import pillow_jxl``),
with what its format carries natively (EXIF with its sub-IFDs, XMP, an ICC profile, alpha)
inside, and reads it back with ``extras_of``. ``jxl-lossless`` restores a JPEG byte for byte
and codes anything else pixel-lossless. Corrupt payloads are CodecErrors, never crashes, and
a payload's own size is checked before its pixels are allocated.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

import pillow_jxl  # noqa: F401  (registers JPEG XL with Pillow)
from ratefit.codecs import registry
from ratefit.codecs.base import NO_EXTRAS, CodecError, Extras, capabilities_of
from ratefit.codecs.jxl import header_size
from ratefit.codecs.rate import Target, search

ARTIST, COPYRIGHT, ORIENTATION, TAKEN = 0x013B, 0x8298, 0x0112, 0x9003
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>A. Photographer</dc:creator>'
       b'</rdf:Description></rdf:RDF></x:xmpmeta>')
LOSSY = ("jpeg", "webp", "avif", "jxl")
FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF", "jxl": "JXL", "jxl-lossless": "JXL"}
H, W = 48, 64


def _exif(orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[ARTIST] = "A. Photographer"
    exif[COPYRIGHT] = "(c) 2026 A. Photographer"
    exif.get_ifd(EXIF_IFD)[TAKEN] = "2026:11:30 10:20:30"
    gps = exif.get_ifd(GPS_IFD)
    gps[1], gps[2], gps[3], gps[4] = "N", (52.0, 31.0, 12.0), "E", (13.0, 24.0, 36.0)
    data = exif.tobytes()
    return data if data.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + data


def _tags(exif: bytes | Image.Exif) -> dict:
    if not isinstance(exif, Image.Exif):
        loaded = Image.Exif()
        loaded.load(exif)
        exif = loaded
    return {"artist": exif.get(ARTIST), "copyright": exif.get(COPYRIGHT), "taken": exif.get_ifd(EXIF_IFD).get(TAKEN),
            "gps": dict(exif.get_ifd(GPS_IFD))}


def _picture() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    noise = np.random.default_rng(1).integers(0, 24, (H, W, 3))
    return (np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1) + noise).clip(0, 255).astype(np.uint8)


def _alpha() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return np.where((xx - 32) ** 2 + (yy - 24) ** 2 < 15 ** 2, 255, (xx * 4 + yy) % 256).astype(np.uint8)


@pytest.fixture()
def extras(wide_gamut_icc) -> Extras:
    return Extras(alpha=_alpha(), icc=wide_gamut_icc, exif=_exif(), xmp=XMP)


def _jpeg(im: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **{"quality": 90, **options})
    return buf.getvalue()


def _as_worker_reads(jpeg: bytes) -> np.ndarray:
    """A JPEG's pixels as the worker reads them: EXIF orientation applied, RGB."""
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


# ----------------------------------------------------------------------------- what the codecs declare

@pytest.mark.parametrize("name,extension,embeds", [
    ("jpeg", "jpg", {"icc", "exif", "xmp"}), ("webp", "webp", {"alpha", "icc", "exif", "xmp"}),
    ("avif", "avif", {"alpha", "icc", "exif", "xmp"}), ("jxl", "jxl", {"alpha", "exif", "xmp"}),
    ("jxl-lossless", "jxl", {"alpha", "exif", "xmp"})])
def test_plain_file_codecs_declare_extension_and_embeds(name, extension, embeds):
    codec = registry.get_codec(name)
    caps = capabilities_of(codec)
    assert codec.extension == extension and caps.plain_file and caps.embeds == embeds
    assert capabilities_of(registry.factory_of(name)) == caps   # declared on the factory too
    assert caps.lossless == caps.restores_original == (name == "jxl-lossless")
    assert registry.preferred_device(name) == "cpu"


# ----------------------------------------------------------------------------- metadata and alpha

@pytest.mark.parametrize("name", LOSSY + ("jxl-lossless",))
def test_the_file_opens_in_plain_pillow_and_carries_what_its_format_embeds(name, extras, wide_gamut_icc):
    codec = registry.get_codec(name)
    embeds = capabilities_of(codec).embeds
    image = _picture()
    payload = codec.encode(codec.prepare(image, extras), 80 if name != "jxl-lossless" else codec.control.low)
    assert not payload.startswith(b"RFIC")
    with Image.open(io.BytesIO(payload)) as im:
        assert im.format == FORMATS[name] and im.size == (W, H)
        assert im.mode == ("RGB" if name == "jpeg" else "RGBA")
        assert _tags(im.getexif()) == _tags(_exif())          # any EXIF reader sees the tags
        if "icc" in embeds:
            assert im.info.get("icc_profile") == wide_gamut_icc
            assert im.info.get("xmp") == XMP

    back = codec.extras_of(payload)
    assert _tags(back.exif) == _tags(_exif()) and back.exif.startswith(b"Exif\x00\x00")
    if name != "avif":   # Pillow's AVIF writer moves the orientation tag into the file's irot/imir boxes
        assert back.exif == _exif()
    assert back.xmp == XMP
    assert back.icc == (wide_gamut_icc if "icc" in embeds else None)
    if name == "jpeg":
        assert back.alpha is None
    else:
        # Lossless for every codec here at this quality: WebP alpha_quality=100, AVIF libaom's
        # a:lossless=1, libjxl codes alpha losslessly from quality 21 up (below that it
        # resamples it; measured up to 188 levels off on a noise alpha).
        assert np.array_equal(back.alpha, _alpha())
    assert codec.decode(payload, W, H, 80).shape == (H, W, 3)


@pytest.mark.parametrize("name", ["webp", "avif", "jxl"])
def test_alpha_is_lossless_across_qualities(name):
    codec = registry.get_codec(name)
    prepared = codec.prepare(_picture(), Extras(alpha=_alpha()))
    for quality in (25, 60, 95):
        assert np.array_equal(codec.extras_of(codec.encode(prepared, quality)).alpha, _alpha()), quality


@pytest.mark.parametrize("name", LOSSY + ("jxl-lossless",))
def test_no_extras_and_an_opaque_alpha_give_none_back(name):
    codec = registry.get_codec(name)
    image = _picture()
    for extras in (NO_EXTRAS, Extras(alpha=np.full((H, W), 255, np.uint8))):
        payload = codec.encode(codec.prepare(image, extras), 70 if name != "jxl-lossless" else 0)
        back = codec.extras_of(payload)
        assert back.exif is None and back.xmp is None and back.icc is None
        assert back.alpha is None


def test_jpeg_without_extras_writes_the_same_bytes_as_before():
    codec = registry.get_codec("jpeg")
    image = _picture()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=75, subsampling="4:2:0", optimize=True)
    assert codec.encode(codec.prepare(image), 75) == buf.getvalue()


def test_an_rgba_file_decodes_to_its_colour_channels_not_composited():
    codec = registry.get_codec("webp")
    image = _picture()
    alpha = np.zeros((H, W), np.uint8)   # fully transparent: compositing would give white or black
    alpha[:4] = 255
    back = codec.decode(codec.encode(codec.prepare(image, Extras(alpha=alpha)), 95), W, H, 95)
    opaque = codec.decode(codec.encode(codec.prepare(image), 95), W, H, 95)
    # libwebp's exact=True keeps the hidden colour: about as close as without alpha (it would
    # otherwise throw the colour under transparent pixels away)
    assert np.abs(back.astype(int) - image).mean() < np.abs(opaque.astype(int) - image).mean() + 1.5


# ----------------------------------------------------------------------------- jxl rate control

def test_jxl_sizes_grow_with_quality_and_the_search_meets_a_bpp_target(kodak_dir):
    image = np.asarray(Image.open(kodak_dir / "kodim01.png").convert("RGB"))[:256, :384]
    codec = registry.get_codec("jxl")
    prepared = codec.prepare(image)
    sizes = [len(codec.encode(prepared, q)) for q in (0, 20, 40, 60, 80, 95, 100)]
    assert sizes == sorted(sizes)
    h, w = image.shape[:2]
    outcome = search(codec, prepared, image, Target("bpp", 1.0), 0)
    assert outcome.status == "ok" and len(outcome.payload) * 8 / (w * h) <= 1.0
    assert len(outcome.payload) * 8 / (w * h) > 0.8
    assert np.array_equal(codec.decode(codec.encode(prepared, 100), w, h, 100), image)   # quality 100: lossless


# ----------------------------------------------------------------------------- jxl-lossless

def _jpeg_extras(jpeg: bytes) -> Extras:
    return Extras(source=jpeg, source_format="JPEG")


@pytest.mark.parametrize("orientation", [1, 6])
def test_jxl_lossless_restores_a_jpeg_byte_for_byte(orientation, wide_gamut_icc):
    im = Image.fromarray(_picture())
    jpeg = _jpeg(im, exif=_exif(orientation), xmp=XMP, icc_profile=wide_gamut_icc)
    pixels = _as_worker_reads(jpeg)
    h, w = pixels.shape[:2]
    assert (w, h) == ((H, W) if orientation == 6 else (W, H))
    codec = registry.get_codec("jxl-lossless")
    prepared = codec.prepare(pixels, _jpeg_extras(jpeg))
    assert prepared.transcoded is not None and prepared.transcode_refused is None
    payload = codec.encode(prepared, codec.control.low)
    assert len(payload) < len(jpeg) and header_size(payload) == (w, h)
    assert codec.original_of(payload) == jpeg
    assert np.array_equal(codec.decode(payload, w, h, 0), pixels)   # oriented, as the input was read
    back = codec.extras_of(payload)
    assert back.alpha is None and back.icc == wide_gamut_icc and back.xmp == XMP
    assert _tags(back.exif) == _tags(_exif())
    loaded = Image.Exif()
    loaded.load(back.exif)
    assert loaded.get(ORIENTATION) == 1                                # the picture is already turned
    with Image.open(io.BytesIO(payload)) as opened:                    # plain Pillow: the rebuilt JPEG
        assert opened.format == "JXL" and opened.size == im.size


def test_jxl_lossless_grey_jpeg_decodes_to_rgb():
    jpeg = _jpeg(Image.fromarray(_picture()).convert("L"))
    codec = registry.get_codec("jxl-lossless")
    payload = codec.encode(codec.prepare(_as_worker_reads(jpeg), _jpeg_extras(jpeg)), 0)
    assert codec.original_of(payload) == jpeg
    back = codec.decode(payload, W, H, 0)
    assert back.shape == (H, W, 3) and np.array_equal(back, _as_worker_reads(jpeg))


def test_jxl_lossless_falls_back_to_pixels_for_a_jpeg_libjxl_refuses():
    jpeg = _jpeg(Image.fromarray(_picture()).convert("CMYK"))
    pixels = _as_worker_reads(jpeg)
    codec = registry.get_codec("jxl-lossless")
    prepared = codec.prepare(pixels, Extras(exif=_exif(), xmp=XMP, source=jpeg, source_format="JPEG"))
    assert prepared.transcoded is None and "transcode" in prepared.transcode_refused
    payload = codec.encode(prepared, 0)
    assert codec.original_of(payload) is None
    assert np.array_equal(codec.decode(payload, W, H, 0), pixels)
    back = codec.extras_of(payload)
    assert back.exif == _exif() and back.xmp == XMP


def test_jxl_lossless_of_a_png_is_pixel_exact_with_its_alpha():
    codec = registry.get_codec("jxl-lossless")
    payload = codec.encode(codec.prepare(_picture(), Extras(alpha=_alpha())), 0)
    assert codec.original_of(payload) is None
    assert np.array_equal(codec.decode(payload, W, H, 0), _picture())
    assert np.array_equal(codec.extras_of(payload).alpha, _alpha())


def test_jxl_lossless_transcodes_a_kodak_jpeg_smaller(kodak_dir):
    jpeg = _jpeg(Image.open(kodak_dir / "kodim01.png").convert("RGB"))
    codec = registry.get_codec("jxl-lossless")
    payload = codec.encode(codec.prepare(_as_worker_reads(jpeg), _jpeg_extras(jpeg)), 0)
    assert codec.original_of(payload) == jpeg
    assert len(payload) < 0.87 * len(jpeg)   # 14.8% smaller at effort 7


# ----------------------------------------------------------------------------- corrupt payloads

def _forged_jxl(side: int) -> bytes:
    """A bare JPEG XL codestream header claiming ``side`` x ``side``, then junk."""
    bits = [0] + [1, 1] + [(side - 1) >> i & 1 for i in range(30)] + [1, 0, 0] + [1]   # small=0, U32 sel 3, ratio 1:1
    data = bytearray(b"\xff\x0a")
    for at in range(0, len(bits), 8):
        data.append(sum(b << i for i, b in enumerate(bits[at:at + 8])))
    return bytes(data) + bytes(range(256)) * 4


def test_a_forged_jxl_header_is_refused_before_decoding():
    assert header_size(_forged_jxl(100_000)) == (100_000, 100_000)
    for name in ("jxl", "jxl-lossless"):
        with pytest.raises(CodecError, match="100000x100000"):
            registry.get_codec(name).decode(_forged_jxl(100_000), W, H, 0)


@pytest.mark.parametrize("name", LOSSY + ("jxl-lossless",))
def test_corrupt_or_truncated_payloads_raise_codec_error(name, extras):
    codec = registry.get_codec(name)
    payload = codec.encode(codec.prepare(_picture(), extras), 80 if name != "jxl-lossless" else 0)
    bad = {"empty": b"", "garbage": bytes(range(256)) * 8, "header only": payload[:40],
           "truncated": payload[:len(payload) // 2], "almost whole": payload[:-8]}
    for what, data in bad.items():
        with pytest.raises(CodecError):
            codec.decode(data, W, H, 80)
            pytest.fail(f"{what} decoded")
    with pytest.raises(CodecError, match=f"{W}x{H}"):
        codec.decode(payload, W + 1, H, 80)
    for data in (b"", bytes(range(256)) * 8, payload[:40]):
        with pytest.raises(CodecError):
            codec.extras_of(data)


def test_jxl_lossless_corrupt_transcode_raises_codec_error():
    jpeg = _jpeg(Image.fromarray(_picture()))
    codec = registry.get_codec("jxl-lossless")
    payload = codec.encode(codec.prepare(_as_worker_reads(jpeg), _jpeg_extras(jpeg)), 0)
    for data in (payload[:len(payload) // 2], payload[:-8]):
        with pytest.raises(CodecError):
            codec.original_of(data)
        with pytest.raises(CodecError):
            codec.decode(data, W, H, 0)
    with pytest.raises(CodecError):
        codec.original_of(b"not a jxl file")
