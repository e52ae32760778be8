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
    length    u32  payload length
    crc32     u32  CRC-32 of the payload
    payload

The header is self-describing so a file can be decoded years later without the manifest,
and the checks make a corrupt or foreign file fail loudly instead of decoding to garbage.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"RFIC"
FORMAT_VERSION = 1
SUFFIX = ".rfic"
_FIXED = struct.Struct("<4sBB")
_MIDDLE = struct.Struct("<dII")
_TAIL = struct.Struct("<II")
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

    @property
    def size(self) -> int:
        """Bytes the header takes in front of the payload."""
        return header_size(self.codec, self.weights_sha256, self.mode)


def header_size(codec: str, weights_sha256: bytes = b"", mode: str = "RGB") -> int:
    return (
        _FIXED.size
        + 1 + len(codec.encode("utf-8"))
        + 1 + len(weights_sha256)
        + _MIDDLE.size
        + 1 + len(mode.encode("ascii", "replace"))
        + _TAIL.size
    )


def _short(data: bytes, what: str) -> bytes:
    if len(data) > 255:
        raise ContainerError(f"{what} is longer than 255 bytes")
    return bytes([len(data)]) + data


def pack(codec: str, payload: bytes, *, value: float, width: int, height: int,
         mode: str = "RGB", weights_sha256: bytes = b"") -> bytes:
    """Wrap a codec payload in a container."""
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise ContainerError(f"image size {width}x{height} is outside 1..{MAX_DIMENSION}")
    return b"".join([
        _FIXED.pack(MAGIC, FORMAT_VERSION, 0),
        _short(codec.encode("utf-8"), "codec name"),
        _short(weights_sha256, "weights hash"),
        _MIDDLE.pack(float(value), width, height),
        _short(mode.encode("ascii", "replace"), "mode"),
        _TAIL.pack(len(payload), zlib.crc32(payload)),
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
    if version != FORMAT_VERSION:
        raise ContainerError(f"unsupported container version {version} (this ratefit reads {FORMAT_VERSION})")
    try:
        codec = r.short("codec name").decode("utf-8")
        weights = r.short("weights hash")
        value, width, height = _MIDDLE.unpack(r.take(_MIDDLE.size, "value and size"))
        mode = r.short("mode").decode("ascii")
    except UnicodeDecodeError as e:
        raise ContainerError(f"corrupt header: {e}") from None
    length, crc = _TAIL.unpack(r.take(_TAIL.size, "payload length"))
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise ContainerError(f"corrupt header: image size {width}x{height}")
    payload = r.data[r.pos:]
    if len(payload) != length:
        raise ContainerError(f"payload is {len(payload)} bytes, header says {length} (truncated or padded file)")
    if zlib.crc32(payload) != crc:
        raise ContainerError("payload checksum mismatch (corrupt file)")
    header = Header(codec=codec, weights_sha256=weights, value=value, width=width, height=height,
                    mode=mode, payload_length=length, crc32=crc, version=version)
    return header, payload
