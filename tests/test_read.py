"""decode_image: every input shape/mode becomes uint8 HxWx3, and bad inputs become ItemErrors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ratefit.workers.read import DEFAULT_MAX_PIXELS, DecodedImage, ItemError, decode_image

RED, BLUE, GREEN, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255), (0, 0, 0)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def check_rgb8(d: DecodedImage, width: int, height: int) -> np.ndarray:
    assert isinstance(d, DecodedImage)
    assert d.pixels.dtype == np.uint8
    assert d.pixels.shape == (height, width, 3)
    assert d.pixels.flags["C_CONTIGUOUS"]
    assert (d.width, d.height) == (width, height)
    return d.pixels


def png_claiming(width: int, height: int, mode: str = "L") -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim ``width`` x ``height`` (CRC fixed up)."""
    data = bytearray(encode(Image.new(mode, (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ------------------------------------------------------------------------- modes

def test_rgb_png_is_exact():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    d = decode_image(encode(Image.fromarray(arr, "RGB"), "PNG"))
    assert np.array_equal(check_rgb8(d, 7, 5), arr)
    assert d.original_mode == "RGB" and d.frames == 1


def test_grayscale_l():
    arr = np.array([[0, 17, 128, 255]], np.uint8)
    d = decode_image(encode(Image.fromarray(arr, "L"), "PNG"))
    px = check_rgb8(d, 4, 1)
    assert d.original_mode == "L"
    for c in range(3):
        assert np.array_equal(px[..., c], arr)


def _palette_image() -> Image.Image:
    p = Image.new("P", (4, 2), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putpixel((1, 0), 1)
    return p


def test_palette_without_transparency():
    d = decode_image(encode(_palette_image(), "PNG"))
    px = check_rgb8(d, 4, 2)
    assert d.original_mode == "P"
    assert tuple(px[0, 0]) == (10, 20, 30)
    assert tuple(px[0, 1]) == (200, 100, 50)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_keeps_alpha(fmt):
    d = decode_image(encode(_palette_image(), fmt, transparency=0))
    check_rgb8(d, 4, 2)
    assert d.original_mode == "P"
    assert d.extras.alpha is not None and d.extras.alpha.shape == (2, 4)
    assert d.extras.alpha[0, 0] == 0 and d.extras.alpha[0, 1] == 255
    px = d.matted()                           # what a viewer shows on white
    assert tuple(px[0, 0]) == WHITE          # transparent index -> white, not (10, 20, 30)
    assert tuple(px[1, 3]) == WHITE
    assert tuple(px[0, 1]) == (200, 100, 50)  # opaque index unchanged


def test_rgba_alpha_kept_and_matted_onto_white():
    im = Image.new("RGBA", (2, 2), (10, 20, 30, 0))       # fully transparent, non-white colour
    im.putpixel((1, 0), (0, 0, 0, 255))
    im.putpixel((0, 1), (0, 0, 0, 128))
    im.putpixel((1, 1), (200, 100, 50, 255))
    d = decode_image(encode(im, "PNG"))
    check_rgb8(d, 2, 2)
    assert d.original_mode == "RGBA"
    assert d.extras.alpha.tolist() == [[0, 255], [128, 255]]         # the alpha travels exactly
    assert tuple(d.pixels[0, 0]) == (10, 20, 30)                     # colour left unmatted
    px = d.matted()
    assert tuple(px[0, 0]) == WHITE
    assert tuple(px[0, 1]) == BLACK
    assert all(abs(int(v) - 127) <= 1 for v in px[1, 0])   # half-transparent black on white
    assert tuple(px[1, 1]) == (200, 100, 50)


def test_opaque_alpha_is_no_alpha():
    d = decode_image(encode(Image.new("RGBA", (3, 2), (1, 2, 3, 255)), "PNG"))
    assert d.extras.alpha is None


def test_la_alpha_kept_and_matted_onto_white():
    im = Image.new("LA", (3, 1))
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (0, 255))
    im.putpixel((2, 0), (100, 128))
    d = decode_image(encode(im, "PNG"))
    check_rgb8(d, 3, 1)
    assert d.original_mode == "LA"
    assert d.extras.alpha.tolist() == [[0, 255, 128]]
    px = d.matted()
    assert tuple(px[0, 0]) == WHITE
    assert tuple(px[0, 1]) == BLACK
    expected = 100 * 128 / 255 + 255 * (1 - 128 / 255)
    assert all(abs(int(v) - expected) <= 1.5 for v in px[0, 2])


@pytest.mark.parametrize("fmt,kw", [("TIFF", {}), ("JPEG", {"quality": 100})])
def test_cmyk(fmt, kw):
    im = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    im.paste((0, 0, 0, 255), (0, 0, 4, 8))
    d = decode_image(encode(im, fmt, **kw))
    px = check_rgb8(d, 8, 8)
    assert d.original_mode == "CMYK"
    assert np.all(np.abs(px[:, 6:].astype(int) - 255) <= 3)   # no ink -> white
    assert np.all(px[:, :2] <= 3)                               # full black ink -> black


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_not_clipped(fmt):
    arr = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    d = decode_image(encode(im, fmt))
    px = check_rgb8(d, 5, 1)
    assert d.original_mode.startswith("I;16")
    assert px[0, :, 0].tolist() == [0, 1, 1, 128, 255]
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2])


def test_16_bit_dark_image_is_still_scaled():
    # every value <= 255: a clip-or-scale guess based on the maximum would get this wrong
    arr = np.array([[0, 100, 200, 255]], dtype=np.uint16)
    d = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert check_rgb8(d, 4, 1)[0, :, 0].tolist() == [0, 0, 1, 1]


def test_16_bit_big_endian_tiff():
    arr = np.array([[0, 32768, 65535]], dtype=">u2")
    d = decode_image(encode(Image.fromarray(arr), "TIFF"))
    assert check_rgb8(d, 3, 1)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_one_bit(fmt):
    im = Image.new("1", (3, 2), 0)
    im.putpixel((1, 0), 1)
    d = decode_image(encode(im, fmt))
    px = check_rgb8(d, 3, 2)
    assert d.original_mode == "1"
    assert tuple(px[0, 1]) == WHITE
    assert tuple(px[0, 0]) == BLACK and tuple(px[1, 2]) == BLACK


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1)])
def test_degenerate_sizes(size):
    w, h = size
    d = decode_image(encode(Image.new("RGB", size, (1, 2, 3)), "PNG"))
    px = check_rgb8(d, w, h)
    assert np.all(px == np.array([1, 2, 3], np.uint8))


def test_tiff_rgb():
    arr = np.random.default_rng(3).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    d = decode_image(encode(Image.fromarray(arr, "RGB"), "TIFF"))
    assert np.array_equal(check_rgb8(d, 5, 6), arr)


# ------------------------------------------------------------------ EXIF orientation

def _oriented_jpeg(orientation: int) -> bytes:
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (0, 0, 10, 10))      # marks the top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes(), quality=95)


def _is(px, colour) -> bool:
    return bool(np.all(np.abs(px.astype(int) - np.array(colour)) <= 16))


def test_exif_orientation_1_is_unchanged():
    px = check_rgb8(decode_image(_oriented_jpeg(1)), 40, 20)
    assert _is(px[2, 2], BLUE) and _is(px[-3, -3], RED)


def test_exif_orientation_6_rotates_clockwise():
    px = check_rgb8(decode_image(_oriented_jpeg(6)), 20, 40)   # width and height swap
    assert _is(px[2, -3], BLUE)       # top-left corner moves to the top-right
    assert _is(px[2, 2], RED) and _is(px[-3, -3], RED)


def test_exif_orientation_8_rotates_counter_clockwise():
    px = check_rgb8(decode_image(_oriented_jpeg(8)), 20, 40)
    assert _is(px[-3, 2], BLUE)       # top-left corner moves to the bottom-left
    assert _is(px[2, 2], RED) and _is(px[2, -3], RED)


# ------------------------------------------------------------------------- animation

@pytest.mark.parametrize("fmt,kw", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_first_frame_and_frame_count(fmt, kw):
    frames = [Image.new("RGB", (8, 6), c) for c in (RED, BLUE, GREEN)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    d = decode_image(data)
    px = check_rgb8(d, 8, 6)
    assert d.frames == 3
    assert np.all(px == np.array(RED, np.uint8))


def test_animated_gif_records_first_frame_mode():
    frames = [Image.new("RGB", (8, 6), c) for c in (RED, BLUE)]
    d = decode_image(encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    assert d.original_mode == "P"


# ----------------------------------------------------------------------------- errors

def _item_error(data: bytes, **kw) -> ItemError:
    with pytest.raises(ItemError) as info:
        decode_image(data, **kw)
    err = info.value
    assert err.stage == "decode"
    assert str(err).startswith("decode: ")
    return err


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(arr, "RGB"), "PNG")


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    arr = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(arr, "RGB"), "JPEG", quality=90)


def test_zero_bytes():
    err = _item_error(b"")
    assert "empty" in err.message and "0 bytes" in err.message


def test_truncated_png(png_bytes):
    err = _item_error(png_bytes[: len(png_bytes) // 2])
    assert "truncated" in err.message and "PNG" in err.message


def test_png_cut_inside_its_header(png_bytes):
    err = _item_error(png_bytes[:30])
    assert err.message


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg(jpeg_bytes, keep):
    err = _item_error(jpeg_bytes[: int(len(jpeg_bytes) * keep)])
    assert "truncated" in err.message.lower()


def test_jpeg_cut_inside_its_header(jpeg_bytes):
    err = _item_error(jpeg_bytes[:100])
    assert "truncated" in err.message.lower() or "header" in err.message.lower()


@pytest.mark.parametrize("data", [b"hello, this is a text file\n", b"\x00" * 100, b"%PDF-1.4\n%...",
                                  b'{"json": true}'])
def test_non_image_bytes(data):
    err = _item_error(data)
    assert "not a recognised image format" in err.message
    assert f"{len(data)} bytes" in err.message


def test_decompression_bomb_is_refused_before_decoding():
    data = png_claiming(60000, 60000)
    assert len(data) < 200
    err = _item_error(data)
    assert "refused before decoding" in err.message
    assert "limit" in err.message and "pixels" in err.message


def test_decompression_bomb_refused_even_with_a_generous_limit():
    err = _item_error(png_claiming(60000, 60000), max_pixels=1_000_000_000)
    assert "pixels" in err.message and "limit" in err.message


def test_header_over_the_default_limit_names_the_limit():
    # 144 Mpx: above DEFAULT_MAX_PIXELS, below Pillow's own bomb error
    err = _item_error(png_claiming(12000, 12000))
    assert "refused before decoding" in err.message
    assert str(DEFAULT_MAX_PIXELS) in err.message and "144000000" in err.message


def test_max_pixels_lower_than_the_image_refuses_it():
    data = encode(Image.new("RGB", (20, 20), RED), "PNG")
    assert decode_image(data, max_pixels=400).pixels.shape == (20, 20, 3)   # exactly at the limit
    err = _item_error(data, max_pixels=399)
    assert "399" in err.message and "400" in err.message and "limit" in err.message
    assert "max-pixels" in err.message


def test_max_pixels_above_pillows_bomb_limit_is_honoured():
    # 13400 x 13400 = 179.56 Mpx, just over Pillow's 178956970; the limit given is 300 Mpx.
    # The header is accepted, so the failure must come from the (truncated) pixel data.
    err = _item_error(png_claiming(13400, 13400), max_pixels=300_000_000)
    assert "refused before decoding" not in err.message
    assert "truncated" in err.message or "corrupt" in err.message


# ------------------------------------------------------------------------- metadata

def test_exif_and_xmp_travel_with_orientation_patched_to_1():
    im = Image.new("RGB", (40, 20), RED)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x013B] = "A. Photographer"
    exif[0x8298] = "(c) 2026 A. Photographer"
    raw = exif.tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/></x:xmpmeta>'
    d = decode_image(encode(im, "JPEG", exif=raw, xmp=xmp))
    assert (d.width, d.height) == (20, 40)                      # rotated as orientation 6 says
    kept = Image.Exif()
    kept.load(d.extras.exif)
    assert kept[0x0112] == 1 and kept[0x013B] == "A. Photographer" and kept[0x8298].startswith("(c) 2026")
    assert len(d.extras.exif) == len(raw if raw.startswith(b"Exif") else b"Exif\0\0" + raw)   # patched in place
    assert d.extras.xmp == xmp


def test_strip_metadata_drops_exif_and_xmp():
    exif = Image.Exif()
    exif[0x013B] = "someone"
    d = decode_image(encode(Image.new("RGB", (8, 8), RED), "JPEG", exif=exif.tobytes(), xmp=b"<x/>"),
                     keep_metadata=False)
    assert d.extras.exif is None and d.extras.xmp is None


def test_rgb_icc_profile_kept_or_converted_to_srgb(wide_gamut_icc):
    # A profile that is not sRGB: the same pixels mean other colours, so --srgb must change them.
    rgb_profile = wide_gamut_icc
    im = Image.new("RGB", (8, 8), (200, 40, 40))
    data = encode(im, "PNG", icc_profile=rgb_profile)
    kept = decode_image(data)
    assert kept.extras.icc == rgb_profile
    assert tuple(kept.pixels[0, 0]) == (200, 40, 40)
    converted = decode_image(data, keep_icc=False)
    assert converted.extras.icc is None
    assert tuple(converted.pixels[0, 0]) != (200, 40, 40)
