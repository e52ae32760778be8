"""The ratefit bitstream container (``RFIC``): a small fixed header, then the codec payload.

Layout (little endian)::

    magic     4s   b"RFIC"
    version   u8   FORMAT_VERSION
    flags     u8   reserved, 0
    codec     u8 length + UTF-8 name (registry key)
    weights   u8 length + SHA-256 of the codec's weights (0 bytes for classical codecs)
    value     f64  the rate-control value the payload was encoded at
    width     u32
    height    u32
    mode      u8 length + ASCII Pillow mode of the *original* image (informational)
    sections  (version 2) u8 count, then per section: tag 4s, u32 length, bytes
    length    u32  payload length
    crc32     u32  CRC-32 of the payload (version 2: of the sections and the payload)
    payload

Sections (version 2) carry what travels beside the coded colour (``Extras``): ``ICCP`` the
ICC profile, ``EXIF`` the EXIF block (``Exif\\0\\0`` + TIFF), ``XMP `` the XMP packet, ``ALPH``
the alpha plane, coded losslessly as an 8-bit grayscale PNG. Version 1 files (no sections)
still decode.

The header is self-describing so a file can be decoded years later without the manifest,
and the checks make a corrupt or foreign file fail loudly instead of decoding to garbage.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ratefit.codecs.base import CodecError, Extras, capabilities_of

MAGIC = b"RFIC"
FORMAT_VERSION = 2
READS = (1, 2)
SUFFIX = ".rfic"
_FIXED = struct.Struct("<4sBB")
_MIDDLE = struct.Struct("<dII")
_TAIL = struct.Struct("<II")
_SECTION = struct.Struct("<4sI")
SECTION_TAGS = {"icc": b"ICCP", "exif": b"EXIF", "xmp": b"XMP ", "alpha": b"ALPH"}
MAX_DIMENSION = 1 << 20


class ContainerError(ValueError):
    """The bytes are not a valid ratefit container; the message says which check failed."""


@dataclass(frozen=True)
class Header:
    codec: str
    weights_sha256: bytes
    value: float
    width: int
    height: int
    mode: str
    payload_length: int
    crc32: int
    version: int = FORMAT_VERSION
    sections: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes the header (sections included) takes in front of the payload."""
        return header_size(self.codec, self.weights_sha256, self.mode, self.sections)


def header_size(codec: str, weights_sha256: bytes = b"", mode: str = "RGB",
                sections: dict[bytes, bytes] | None = None) -> int:
    return (
        _FIXED.size
        + 1 + len(codec.encode("utf-8"))
        + 1 + len(weights_sha256)
        + _MIDDLE.size
        + 1 + len(mode.encode("ascii", "replace"))
        + 1 + sum(_SECTION.size + len(v) for v in (sections or {}).values())
        + _TAIL.size
    )


def sections_of(extras: Extras) -> dict[bytes, bytes]:
    """The sections that carry ``extras`` (an opaque or absent alpha is not stored)."""
    out: dict[bytes, bytes] = {}
    for part, tag in SECTION_TAGS.items():
        value = getattr(extras, part)
        if value is None:
            continue
        if part == "alpha":
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(value, dtype=np.uint8), "L").save(buf, "PNG", optimize=True)
            value = buf.getvalue()
        out[tag] = bytes(value)
    return out


def extras_of(header: Header) -> Extras:
    """What a container's sections carry; raises ContainerError for an alpha that does not fit."""
    found: dict[str, object] = {}
    for part, tag in SECTION_TAGS.items():
        value = header.sections.get(tag)
        if value is None:
            continue
        if part == "alpha":
            value = _alpha_plane(value, header.width, header.height)
        found[part] = value
    return Extras(**found)


def _alpha_plane(png: bytes, width: int, height: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(png), formats=["PNG"]) as im:
                if im.size != (width, height) or im.mode != "L":   # checked before any pixel is decoded
                    raise ContainerError(f"alpha section is {im.mode} {im.size[0]}x{im.size[1]}, "
                                         f"image is {width}x{height}")
                im.load()
                return np.asarray(im, dtype=np.uint8)
    except ContainerError:
        raise
    except Exception as e:
        raise ContainerError(f"alpha section does not decode: {type(e).__name__}: {e}") from None


def _short(data: bytes, what: str) -> bytes:
    if len(data) > 255:
        raise ContainerError(f"{what} is longer than 255 bytes")
    return bytes([len(data)]) + data


def pack(codec: str, payload: bytes, *, value: float, width: int, height: int,
         mode: str = "RGB", weights_sha256: bytes = b"", sections: dict[bytes, bytes] | None = None) -> bytes:
    """Wrap a codec payload (and the sections carrying its ``Extras``) in a container."""
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise ContainerError(f"image size {width}x{height} is outside 1..{MAX_DIMENSION}")
    sections = sections or {}
    if len(sections) > 255:
        raise ContainerError("more than 255 sections")
    body = b"".join(_SECTION.pack(tag, len(data)) + data for tag, data in sections.items())
    return b"".join([
        _FIXED.pack(MAGIC, FORMAT_VERSION, 0),
        _short(codec.encode("utf-8"), "codec name"),
        _short(weights_sha256, "weights hash"),
        _MIDDLE.pack(float(value), width, height),
        _short(mode.encode("ascii", "replace"), "mode"),
        bytes([len(sections)]), body,
        _TAIL.pack(len(payload), zlib.crc32(payload, zlib.crc32(body))),
        payload,
    ])


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ContainerError(f"truncated header: {what} needs {n} bytes at offset {self.pos}, "
                                 f"file has {len(self.data)}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def short(self, what: str) -> bytes:
        return self.take(self.take(1, what)[0], what)


def unpack(data: bytes) -> tuple[Header, bytes]:
    """Parse and check a container; return its header and payload.

    Raises ContainerError for a wrong magic, an unknown version, a size mismatch or a bad
    checksum. Whether the codec is known and the weights match is the caller's check,
    because only it knows which codecs and weights are loaded.
    """
    r = _Reader(bytes(data))
    magic, version, _flags = _FIXED.unpack(r.take(_FIXED.size, "magic"))
    if magic != MAGIC:
        raise ContainerError(f"not a ratefit container (magic {magic!r}, expected {MAGIC!r})")
    if version not in READS:
        raise ContainerError(f"unsupported container version {version} (this ratefit reads "
                             f"{', '.join(map(str, READS))})")
    try:
        codec = r.short("codec name").decode("utf-8")
        weights = r.short("weights hash")
        value, width, height = _MIDDLE.unpack(r.take(_MIDDLE.size, "value and size"))
        mode = r.short("mode").decode("ascii")
    except UnicodeDecodeError as e:
        raise ContainerError(f"corrupt header: {e}") from None
    sections: dict[bytes, bytes] = {}
    start = r.pos
    if version >= 2:
        for i in range(r.take(1, "section count")[0]):
            tag, n = _SECTION.unpack(r.take(_SECTION.size, f"section {i}"))
            sections[tag] = r.take(n, f"section {tag!r}")
    body = r.data[start + (1 if version >= 2 else 0):r.pos]
    length, crc = _TAIL.unpack(r.take(_TAIL.size, "payload length"))
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise ContainerError(f"corrupt header: image size {width}x{height}")
    payload = r.data[r.pos:]
    if len(payload) != length:
        raise ContainerError(f"payload is {len(payload)} bytes, header says {length} (truncated or padded file)")
    if zlib.crc32(payload, zlib.crc32(body)) != crc:
        raise ContainerError("payload checksum mismatch (corrupt file)")
    header = Header(codec=codec, weights_sha256=weights, value=value, width=width, height=height,
                    mode=mode, payload_length=length, crc32=crc, version=version, sections=sections)
    return header, payload


def decode_checked(codec, header: Header, payload: bytes, groups: int | None = None) -> np.ndarray:
    """The codec's picture for a parsed container, held to the size its header gives.

    The one decode of a container's payload (``ratefit decompress``, ``--verify``, the reading
    API and the Pillow plugin): a codec error or a picture of the wrong shape is a CodecError.
    ``groups``: decode only the first latent groups (a preview; codecs declaring ``progressive``).
    """
    if groups is None:
        pixels = codec.decode(payload, header.width, header.height, header.value)
    elif capabilities_of(codec).progressive:
        pixels = codec.decode_progressive(payload, header.width, header.height, header.value, groups)
    else:
        raise CodecError(f"{header.codec} does not decode progressively (no latent groups to stop after)")
    if not isinstance(pixels, np.ndarray) or pixels.shape != (header.height, header.width, 3) \
            or pixels.dtype != np.uint8:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise CodecError(f"{header.codec} decoded to {got}, header says {header.width}x{header.height}")
    return pixels
