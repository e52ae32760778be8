"""The RFIC container: round trips, header size, and loud failures on bad bytes."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numpy as np

from ratefit.codecs.base import Extras
from ratefit.codecs.container import (
    FORMAT_VERSION,
    MAGIC,
    MAX_DIMENSION,
    ContainerError,
    Header,
    header_size,
    extras_of,
    pack,
    sections_of,
    unpack,
)

SHA = hashlib.sha256(b"some weights").digest()


def _blob(payload: bytes = b"payload bytes \x00\x01\xff", **kw) -> bytes:
    args = dict(value=42.5, width=451, height=300, mode="RGB", weights_sha256=b"")
    args.update(kw)
    codec = args.pop("codec", "jpeg")
    return pack(codec, payload, **args)


def _offset_of_size_fields(codec: str = "jpeg", weights: bytes = b"") -> int:
    """Byte offset of the width field (value f64 comes first in the middle block)."""
    return 6 + 1 + len(codec.encode("utf-8")) + 1 + len(weights) + 8


# ------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("codec,weights,mode,payload", [
    ("jpeg", b"", "RGB", b"\xff\xd8 jpeg-ish \xff\xd9"),
    ("webp", b"", "RGBA", b""),
    ("learned-ü", SHA, "I;16", bytes(range(256)) * 4),
    ("x", SHA, "1", b"\x00"),
])
def test_pack_unpack_round_trip(codec, weights, mode, payload):
    blob = pack(codec, payload, value=0.123456789, width=7, height=MAX_DIMENSION,
                mode=mode, weights_sha256=weights)
    header, out = unpack(blob)
    assert out == payload
    assert header == Header(codec=codec, weights_sha256=weights, value=0.123456789, width=7,
                            height=MAX_DIMENSION, mode=mode, payload_length=len(payload),
                            crc32=zlib.crc32(payload), version=FORMAT_VERSION)
    assert blob.startswith(MAGIC)


def test_unpack_accepts_bytearray_and_memoryview():
    blob = _blob()
    assert unpack(bytearray(blob))[1] == unpack(memoryview(blob))[1] == unpack(blob)[1]


@pytest.mark.parametrize("codec,weights,mode", [
    ("jpeg", b"", "RGB"),
    ("avif", b"", "RGBA"),
    ("bmshj2018-hyperprior-ü", SHA, "CMYK"),
    ("", b"", ""),
    ("c" * 255, b"w" * 255, "M" * 255),
])
def test_header_size_is_the_real_header_length(codec, weights, mode):
    payload = b"0123456789"
    blob = pack(codec, payload, value=1.0, width=1, height=1, mode=mode, weights_sha256=weights)
    assert header_size(codec, weights, mode) == len(blob) - len(payload)
    header, _ = unpack(blob)
    assert header.size == len(blob) - len(payload)


def test_header_size_defaults_match_a_classical_rgb_container():
    blob = pack("jpeg", b"abc", value=50, width=10, height=10)
    assert header_size("jpeg") == len(blob) - 3


# ------------------------------------------------------------------------ bad inputs

def test_wrong_magic():
    blob = b"RFIX" + _blob()[4:]
    with pytest.raises(ContainerError, match="not a ratefit container"):
        unpack(blob)


def test_foreign_file_is_not_a_container():
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    with pytest.raises(ContainerError, match="not a ratefit container"):
        unpack(png)


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 255])
def test_unknown_version(version):
    blob = bytearray(_blob())
    blob[4] = version
    with pytest.raises(ContainerError, match=f"unsupported container version {version}"):
        unpack(bytes(blob))


def test_every_truncated_header_is_reported_as_truncated():
    payload = b"xyz"
    blob = _blob(payload, weights_sha256=SHA)
    hsize = len(blob) - len(payload)
    for n in range(hsize):
        with pytest.raises(ContainerError, match="truncated header"):
            unpack(blob[:n])


def test_empty_input():
    with pytest.raises(ContainerError, match="truncated header"):
        unpack(b"")


@pytest.mark.parametrize("cut", [1, 2, 10])
def test_truncated_payload(cut):
    payload = b"p" * 20
    blob = _blob(payload)
    with pytest.raises(ContainerError, match=r"payload is \d+ bytes, header says 20"):
        unpack(blob[:-cut])


def test_payload_missing_entirely():
    payload = b"p" * 20
    blob = _blob(payload)
    with pytest.raises(ContainerError, match="payload is 0 bytes, header says 20"):
        unpack(blob[:-20])


@pytest.mark.parametrize("extra", [b"\x00", b"trailing garbage"])
def test_padded_payload(extra):
    blob = _blob(b"p" * 20)
    with pytest.raises(ContainerError, match="truncated or padded"):
        unpack(blob + extra)


def test_bad_crc_in_payload():
    blob = bytearray(_blob(b"p" * 20))
    blob[-5] ^= 0x01
    with pytest.raises(ContainerError, match="checksum"):
        unpack(bytes(blob))


def test_bad_crc_field():
    payload = b"p" * 20
    blob = bytearray(_blob(payload))
    crc_at = len(blob) - len(payload) - 4
    blob[crc_at] ^= 0x80
    with pytest.raises(ContainerError, match="checksum"):
        unpack(bytes(blob))


@pytest.mark.parametrize("width,height", [(0, 10), (10, 0), (0, 0), (MAX_DIMENSION + 1, 1),
                                          (1, MAX_DIMENSION + 1), (2**32 - 1, 2**32 - 1)])
def test_bad_dimensions_in_header_are_refused(width, height):
    blob = bytearray(_blob())
    at = _offset_of_size_fields()
    blob[at:at + 8] = struct.pack("<II", width, height)
    with pytest.raises(ContainerError, match=f"image size {width}x{height}"):
        unpack(bytes(blob))


@pytest.mark.parametrize("width,height", [(0, 10), (10, 0), (-1, 5), (MAX_DIMENSION + 1, 1),
                                          (1, MAX_DIMENSION + 1)])
def test_pack_refuses_bad_dimensions(width, height):
    with pytest.raises(ContainerError, match="outside"):
        pack("jpeg", b"x", value=1, width=width, height=height)


def test_pack_accepts_the_dimension_limit():
    header, _ = unpack(pack("jpeg", b"x", value=1, width=MAX_DIMENSION, height=MAX_DIMENSION))
    assert (header.width, header.height) == (MAX_DIMENSION, MAX_DIMENSION)


@pytest.mark.parametrize("kw", [
    {"codec": "c" * 256},
    {"weights_sha256": b"w" * 256},
    {"mode": "M" * 256},
])
def test_pack_refuses_overlong_short_fields(kw):
    with pytest.raises(ContainerError, match="longer than 255 bytes"):
        _blob(**kw)


def test_non_utf8_codec_name_is_a_container_error():
    blob = bytearray(_blob(codec="jpeg"))
    blob[7] = 0xFF   # first byte of the codec name
    with pytest.raises(ContainerError, match="corrupt header"):
        unpack(bytes(blob))


def test_non_ascii_mode_is_a_container_error():
    payload = b"abc"
    blob = bytearray(_blob(payload, mode="RGB"))
    mode_at = len(blob) - len(payload) - 8 - 1 - 3   # tail, section count (0), mode
    assert bytes(blob[mode_at:mode_at + 3]) == b"RGB"
    blob[mode_at] = 0xC3
    with pytest.raises(ContainerError, match="corrupt header"):
        unpack(bytes(blob))


# ------------------------------------------------------------------------ properties

def _unpack_or_container_error(data: bytes):
    try:
        return unpack(data)
    except ContainerError:
        return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_parse_or_raise_container_error(data):
    out = _unpack_or_container_error(data)   # any other exception fails the test
    if out is not None:
        header, payload = out
        assert len(payload) == header.payload_length
        assert zlib.crc32(payload) == header.crc32


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_behind_a_valid_prefix_parse_or_raise_container_error(tail):
    data = MAGIC + bytes([FORMAT_VERSION, 0]) + tail
    out = _unpack_or_container_error(data)
    if out is not None:
        header, payload = out
        assert zlib.crc32(payload) == header.crc32


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=64),
    codec=st.sampled_from(["jpeg", "webp", "learned"]),
    weights=st.sampled_from([b"", SHA]),
    mutations=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    extra=st.binary(max_size=8),
)
def test_mutated_containers_parse_to_the_same_payload_or_raise_container_error(
        payload, codec, weights, mutations, cut, extra):
    blob = bytearray(pack(codec, payload, value=3.5, width=64, height=48, weights_sha256=weights))
    for pos, byte in mutations:
        blob[pos % len(blob)] = byte
    data = bytes(blob)
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    data += extra
    out = _unpack_or_container_error(data)
    if out is not None:
        _, parsed = out
        assert parsed == payload


# ------------------------------------------------------------------------ sections (version 2)

def _v1_blob(payload: bytes, codec: str = "jpeg") -> bytes:
    """A container as version 1 wrote it (no sections; the CRC covers the payload only)."""
    name = codec.encode()
    return b"".join([struct.pack("<4sBB", MAGIC, 1, 0), bytes([len(name)]), name, bytes([0]),
                     struct.pack("<dII", 3.0, 7, 5), bytes([3]), b"RGB",
                     struct.pack("<II", len(payload), zlib.crc32(payload)), payload])


def test_version_1_files_still_decode():
    header, payload = unpack(_v1_blob(b"old payload"))
    assert (header.version, header.codec, header.width, header.height) == (1, "jpeg", 7, 5)
    assert payload == b"old payload" and header.sections == {}
    assert extras_of(header) == Extras()


def test_extras_round_trip_through_sections():
    alpha = (np.arange(6 * 4) * 11 % 256).astype(np.uint8).reshape(4, 6)
    extras = Extras(alpha=alpha, icc=b"icc profile bytes", exif=b"Exif\0\0II*\0", xmp=b"<x:xmpmeta/>")
    sections = sections_of(extras)
    blob = pack("gain-hyperprior", b"coded", value=1.5, width=6, height=4, sections=sections)
    assert len(blob) == header_size("gain-hyperprior", b"", "RGB", sections) + len(b"coded")
    header, payload = unpack(blob)
    assert header.version == FORMAT_VERSION == 2 and payload == b"coded"
    back = extras_of(header)
    assert np.array_equal(back.alpha, alpha)                       # lossless
    assert (back.icc, back.exif, back.xmp) == (extras.icc, extras.exif, extras.xmp)


def test_no_extras_no_sections():
    assert sections_of(Extras()) == {}


def test_corrupt_section_fails_the_checksum():
    blob = bytearray(pack("jpeg", b"p", value=1, width=2, height=2, sections={b"XMP ": b"<xmp/>"}))
    blob[blob.index(b"<xmp/>")] ^= 1
    with pytest.raises(ContainerError, match="checksum"):
        unpack(bytes(blob))


def test_alpha_section_of_the_wrong_size_is_refused():
    sections = sections_of(Extras(alpha=np.zeros((3, 3), np.uint8)))
    header, _ = unpack(pack("jpeg", b"p", value=1, width=4, height=4, sections=sections))
    with pytest.raises(ContainerError, match="alpha section"):
        extras_of(header)
