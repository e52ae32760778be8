"""JPEG XL through libjxl, by way of the ``pillow-jxl-plugin`` package (import name ``pillow_jxl``).

Two plain-file codecs (``Capabilities.plain_file``: the payload is a ``.jxl`` file, stored as
is, that ``import pillow_jxl`` lets plain Pillow open):

* ``jxl``: lossy (VarDCT in XYB). The rate-control value is the integer quality 0..100 of
  ``cjxl -q`` (libjxl maps it to a Butteraugli distance); 100 means mathematically lossless, as
  for ``cjxl`` (libjxl refuses a lossy encode at distance 0). Sizes grow monotonically with
  quality (Kodak kodim01 at effort 7: 0.17 bpp at 0, 0.72 at 50, 2.6 at 90, 5.9 at 99, 9.4
  lossless), which the discrete search in ``rate.py`` relies on.
* ``jxl-lossless``: no rate control (``lossless``). A JPEG input is transcoded losslessly
  (libjxl's JPEG recompression: the JPEG's DCT coefficients re-coded, plus the data that
  rebuild the very JPEG file), so ``original_of`` gives the input back byte for byte
  (``restores_original``); a JPEG libjxl cannot represent (CMYK, arithmetic coding, ...) and
  any other input is coded pixel-lossless.

Both embed alpha, EXIF and XMP, but **not an ICC profile**: pillow-jxl's ``Encoder`` takes
none, so a JPEG XL file written here is always sRGB, and the worker converts an input with a
profile to sRGB first (``embeds`` has no "icc"). A transcoded JPEG keeps all of its own
metadata, its profile included, inside the reconstruction data; ``extras_of`` reads them from
the rebuilt JPEG.

pylibjxl was tried first and rejected: its lossy encodes came out at 6 bpp for 35 dB on Kodak,
where pillow-jxl gives 1.6 bpp at 34 dB.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ratefit.codecs.base import NO_EXTRAS, Capabilities, CodecError, ControlRange, Extras
from ratefit.codecs.pillow import EXIF_PREFIX, _checked_alpha, exif_orientation_1, exif_with_prefix, opaque_to_none, xmp_bytes

DEFAULT_EFFORT = 7
# Lossless JPEG transcoding of the 24 Kodak photos saved by Pillow at quality 90 (2 CPU cores):
# effort 7 saves 14.77% (12 ms per image), effort 9 14.88% (165 ms), effort 10 14.80% (191 ms);
# kodim01 alone 14.8% at 7 and 15.2% at 9. Effort 7 is the default: the 0.1% more of 9 costs
# fourteen times the time. Pixel-lossless encodes are far slower at 9 (seconds per photo).

_CONTAINER_SIGNATURE = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_CODESTREAM_SIGNATURE = b"\xff\x0a"
_EXIF_BOX_OFFSET = b"\x00\x00\x00\x00"   # an Exif box starts with the offset of the TIFF header
_MODES = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}   # 8-bit sample layouts decode() accepts


def _libjxl():
    try:
        import pillow_jxl  # noqa: F401  (also registers the JXL plugin with Pillow)
        from pillow_jxl import Decoder, Encoder
    except ImportError as e:   # a dependency of ratefit; missing only in a broken install
        raise CodecError(f"JPEG XL needs the pillow-jxl-plugin package (pip install 'pillow-jxl-plugin>=1.3.8,<2'): "
                         f"{e}") from e
    return Encoder, Decoder


def _fail(name: str, what: str, e: BaseException) -> CodecError:
    detail = " ".join(str(e).split())[:200]
    return CodecError(f"{name} {what}: {type(e).__name__}: {detail}")


def _guarded(name: str, what: str, call, *args, **kwargs):
    """``call(...)``, any failure of libjxl (a RuntimeError, or a Rust panic, which is a
    BaseException) as a CodecError; interrupts pass through."""
    try:
        return call(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit, GeneratorExit, CodecError):
        raise
    except BaseException as e:
        raise _fail(name, what, e) from e


# ----------------------------------------------------------------------------- the file's header

def _boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, content) of each box of a JPEG XL container; a truncated last box is cut short."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        head = 8
        if size == 1:
            if pos + 16 > len(data):
                break
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            head = 16
        elif size == 0:
            size = len(data) - pos
        if size < head:
            raise CodecError(f"JPEG XL box {kind!r} at byte {pos} claims {size} bytes")
        out.append((kind, data[pos + head:pos + size]))
        pos += size
    return out


def _codestream_head(data: bytes, need: int = 64) -> bytes:
    """The first ``need`` bytes of the codestream, from a bare codestream or a container."""
    if data[:2] == _CODESTREAM_SIGNATURE:
        return data[:need]
    if data[:12] != _CONTAINER_SIGNATURE:
        raise CodecError(f"not a JPEG XL file ({len(data)} bytes, starts {bytes(data[:12])!r})")
    head = b""
    for kind, content in _boxes(data):
        if kind == b"jxlc":
            head += content
        elif kind == b"jxlp":
            head += content[4:]   # after the part's index
        if len(head) >= need:
            break
    if head[:2] != _CODESTREAM_SIGNATURE:
        raise CodecError("JPEG XL container holds no codestream")
    return head[:need]


class _Bits:
    """JPEG XL's bit reader: least significant bit first."""

    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos * 8

    def u(self, n: int) -> int:
        value = 0
        for i in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise CodecError("JPEG XL header is truncated")
            value |= ((self.data[byte] >> (self.pos & 7)) & 1) << i
            self.pos += 1
        return value

    def size(self, small: bool) -> int:
        if small:
            return (self.u(5) + 1) * 8
        return self.u((9, 13, 18, 30)[self.u(2)]) + 1


_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) as displayed, from the codestream's SizeHeader and orientation (ISO/IEC
    18181-1 SizeHeader and ImageMetadata), read without decoding anything."""
    bits = _Bits(_codestream_head(data), 2)
    small = bool(bits.u(1))
    height = bits.size(small)
    ratio = bits.u(3)
    if ratio:
        num, den = _RATIOS[ratio]
        width = height * num // den
    else:
        width = bits.size(small)
    orientation = 1
    if not bits.u(1):          # ImageMetadata.all_default
        if bits.u(1):          # extra_fields
            orientation = 1 + bits.u(3)
    return (height, width) if orientation > 4 else (width, height)


def _check_size(name: str, payload: bytes, width: int, height: int, either_way: bool = False) -> None:
    """The payload's own size against the expected one, before anything is allocated."""
    size = header_size(payload)
    if size == (width, height) or (either_way and size == (height, width)):
        return
    raise CodecError(f"{name} payload is {size[0]}x{size[1]}, container header says {width}x{height}")


# ----------------------------------------------------------------------------- pixels and metadata

def _samples(name: str, info: Any, data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """A decoded frame as (RGB uint8 HxWx3, alpha uint8 HxW or None)."""
    channels = _MODES.get(info.mode)
    if channels is None:
        raise CodecError(f"{name} payload decodes to {info.mode} samples, not 8-bit RGB or grey")
    w, h = int(info.width), int(info.height)
    if len(data) != w * h * channels:
        raise CodecError(f"{name} payload decoded to {len(data)} bytes, not {w}x{h}x{channels}")
    arr = np.frombuffer(data, np.uint8).reshape(h, w, channels)
    colour = arr[..., :3] if channels >= 3 else np.repeat(arr[..., :1], 3, axis=2)
    alpha = arr[..., channels - 1] if channels in (2, 4) else None
    return np.ascontiguousarray(colour), alpha


def _exif_box(exif: bytes | None) -> bytes | None:
    """Extras' EXIF (``Exif\\0\\0`` + TIFF) as an Exif box's content (TIFF offset + TIFF)."""
    if not exif:
        return None
    tiff = exif[len(EXIF_PREFIX):] if exif.startswith(EXIF_PREFIX) else exif
    return _EXIF_BOX_OFFSET + tiff


def _exif_of_box(content: bytes) -> bytes | None:
    if len(content) > 4:
        (offset,) = struct.unpack_from(">I", content)
        tiff = content[4 + offset:]
        if tiff[:4] in (b"II*\x00", b"MM\x00*"):
            return EXIF_PREFIX + tiff
    if content[:4] in (b"II*\x00", b"MM\x00*"):   # a writer that left the offset out
        return EXIF_PREFIX + content
    return exif_with_prefix(content)


def _metadata_of(boxes: list[Any]) -> tuple[bytes | None, bytes | None]:
    exif = xmp = None
    for box in boxes:
        if box.box_type == b"Exif" and exif is None:
            exif = _exif_of_box(bytes(box.data))
        elif box.box_type == b"xml " and xmp is None:
            xmp = bytes(box.data) or None
    return exif, xmp


def _open_jpeg(name: str, jpeg: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # callers check the size
        try:
            return Image.open(io.BytesIO(jpeg), formats=["JPEG"])
        except Exception as e:
            raise _fail(name, "holds a JPEG that does not open", e) from e


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    w, h = im.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _jpeg_picture(name: str, jpeg: bytes, width: int, height: int) -> np.ndarray:
    """A rebuilt JPEG's picture as the worker read the input: EXIF orientation applied, RGB."""
    try:
        with _open_jpeg(name, jpeg) as im:
            if _oriented_size(im) != (width, height):
                raise CodecError(f"{name} payload's JPEG is {im.size[0]}x{im.size[1]} (turned: "
                                 f"{'x'.join(map(str, _oriented_size(im)))}), container header says "
                                 f"{width}x{height}")
            im.load()
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception:
                oriented = im   # a broken EXIF block: the worker's reader keeps it unturned too
            rgb = np.asarray(oriented.convert("RGB"))
    except CodecError:
        raise
    except Exception as e:
        raise _fail(name, "payload's JPEG does not decode", e) from e
    if rgb.shape != (height, width, 3):
        raise CodecError(f"{name} payload decoded to {rgb.shape[1]}x{rgb.shape[0]}, expected {width}x{height}")
    return rgb


def _jpeg_extras(name: str, jpeg: bytes) -> Extras:
    try:
        with _open_jpeg(name, jpeg) as im:
            info = dict(im.info)
    except CodecError:
        raise
    except Exception as e:
        raise _fail(name, "payload's JPEG does not open", e) from e
    return Extras(icc=info.get("icc_profile") or None, exif=exif_orientation_1(info.get("exif")),
                  xmp=xmp_bytes(info.get("xmp")))


def _check_image(name: str, image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CodecError(f"{name} expects uint8 HxWx3, got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")


# ----------------------------------------------------------------------------- the codecs

@dataclass
class JxlPrepared:
    """One image ready for ``encode``: interleaved 8-bit samples and the metadata boxes, or
    (``jxl-lossless`` of a JPEG) the finished transcode."""

    width: int
    height: int
    mode: str = "RGB"                   # "RGB" | "RGBA"
    samples: bytes = b""
    exif: bytes | None = None           # the Exif box's content: TIFF offset + TIFF
    xmp: bytes | None = None
    transcoded: bytes | None = None     # jxl-lossless: the JPEG's lossless transcode
    transcode_refused: str | None = None   # jxl-lossless: why a JPEG source was coded as pixels
    lossless: bytes | None = field(default=None, repr=False)   # the pixel-lossless file, once made


def _prepare_pixels(name: str, image: np.ndarray, extras: Extras, embeds: frozenset[str]) -> JxlPrepared:
    _check_image(name, image)
    extras = extras.only(embeds)
    h, w = image.shape[:2]
    alpha = _checked_alpha(name, extras.alpha, (h, w))
    if alpha is not None:
        mode, samples = "RGBA", np.ascontiguousarray(np.dstack([image, alpha])).tobytes()
    else:
        mode, samples = "RGB", np.ascontiguousarray(image).tobytes()
    return JxlPrepared(width=w, height=h, mode=mode, samples=samples, exif=_exif_box(extras.exif),
                       xmp=bytes(extras.xmp) if extras.xmp else None)


def _check_effort(effort: int) -> int:
    if isinstance(effort, bool) or not isinstance(effort, int) or not 1 <= effort <= 10:
        raise CodecError(f"JPEG XL effort must be an integer 1..10, got {effort!r}")
    return effort


_EMBEDS = frozenset({"alpha", "exif", "xmp"})   # no "icc": pillow-jxl's Encoder takes no profile
JXL_CAPS = Capabilities(preferred_device="cpu", plain_file=True, embeds=_EMBEDS)
JXL_LOSSLESS_CAPS = Capabilities(preferred_device="cpu", plain_file=True, embeds=_EMBEDS, lossless=True,
                                 restores_original=True)


@dataclass
class JxlCodec:
    """Lossy JPEG XL; ``quality`` 0..100 as ``cjxl -q`` (100: lossless)."""

    name: str = "jxl"
    extension: str = "jxl"
    control: ControlRange = field(default_factory=lambda: ControlRange("quality", 0, 100, increasing=True,
                                                                       discrete=True))
    effort: int = DEFAULT_EFFORT
    decoding_speed: int = 0
    num_threads: int = -1               # libjxl's threads; -1: every core
    weights_sha256: bytes = b""
    device: str = "cpu"
    speed: str = "medium"
    capabilities: Capabilities = JXL_CAPS

    @property
    def embeds(self) -> frozenset[str]:
        return self.capabilities.embeds

    def prepare(self, image: np.ndarray, extras: Extras = NO_EXTRAS) -> JxlPrepared:
        return _prepare_pixels(self.name, image, extras, self.embeds)

    @property
    def transcodes(self) -> bool:
        """Whether its payloads may be lossless JPEG transcodes (whose size libjxl may turn)."""
        return self.capabilities.restores_original

    def estimate(self, prepared: JxlPrepared, value: float) -> float | None:
        return None

    def _encode_pixels(self, prepared: JxlPrepared, quality: float, lossless: bool) -> bytes:
        if lossless and prepared.lossless is not None:   # one value: made once (rate search caches the rest)
            return prepared.lossless
        Encoder, _ = _libjxl()
        # A bare codestream unless metadata boxes need the container (libjxl decides).
        enc = _guarded(self.name, "encoder refused its settings", Encoder, mode=prepared.mode,
                       lossless=lossless, quality=100.0 if lossless else float(quality),
                       decoding_speed=self.decoding_speed, effort=self.effort, use_container=False,
                       use_original_profile=lossless, num_threads=self.num_threads)
        payload = _guarded(self.name, "cannot encode this image", enc, prepared.samples, prepared.width,
                           prepared.height, jpeg_encode=False, exif=prepared.exif, jumb=None, xmp=prepared.xmp,
                           compress=False)
        if lossless:
            prepared.lossless = payload
        return payload

    def encode(self, prepared: JxlPrepared, value: float) -> bytes:
        quality = self.control.clamp(value)
        return self._encode_pixels(prepared, quality, lossless=quality >= 100)

    def _decoded(self, payload: bytes, width: int, height: int, either_way: bool = False):
        _check_size(self.name, payload, width, height, either_way)
        _, Decoder = _libjxl()
        return _guarded(self.name, "payload does not decode", Decoder(num_threads=self.num_threads), payload)

    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
        """The picture, RGB uint8 HxWx3 (an RGBA file's colour channels, not composited)."""
        # libjxl turns a transcode's size by the JPEG's EXIF orientation (jxl-lossless): either way
        # round is bounded by the expected size, and the picture's own size is checked after.
        is_jpeg, info, data, _icc, _boxes = self._decoded(payload, width, height, either_way=self.transcodes)
        if is_jpeg:   # a lossless transcode (also under this codec's name): the JPEG's picture, as
            # the worker read the input (EXIF orientation applied, grey as RGB)
            return _jpeg_picture(self.name, data, width, height)
        rgb, _ = _samples(self.name, info, data)
        if rgb.shape[:2] != (height, width):
            raise CodecError(f"{self.name} payload decoded to {rgb.shape[1]}x{rgb.shape[0]}, "
                             f"expected {width}x{height}")
        return rgb

    def extras_of(self, payload: bytes) -> Extras:
        """Alpha (None when absent or fully opaque), EXIF (``Exif\\0\\0`` + TIFF) and XMP from
        the file's boxes. ``icc`` is None: libjxl reports a synthesised sRGB profile for every
        file this codec writes, which is not the input's."""
        width, height = header_size(payload)
        is_jpeg, info, data, _icc, boxes = self._decoded(payload, width, height)
        if is_jpeg:
            return _jpeg_extras(self.name, data)
        _, alpha = _samples(self.name, info, data)
        exif, xmp = _metadata_of(boxes)
        return Extras(alpha=None if alpha is None else opaque_to_none(alpha), exif=exif, xmp=xmp)


@dataclass
class JxlLosslessCodec(JxlCodec):
    """Lossless JPEG XL: a JPEG's lossless transcode (restorable byte for byte), else pixels.

    There is no rate to control: ``control`` is a single position (``lossless`` 0..0) and
    ``encode`` ignores the value; ``effort`` is the only setting.
    """

    name: str = "jxl-lossless"
    control: ControlRange = field(default_factory=lambda: ControlRange("lossless", 0, 0, increasing=True,
                                                                       discrete=True))
    capabilities: Capabilities = JXL_LOSSLESS_CAPS

    def prepare(self, image: np.ndarray, extras: Extras = NO_EXTRAS) -> JxlPrepared:
        """A JPEG source (``extras.source_format == "JPEG"``) is transcoded here, once; when
        libjxl refuses it (or its rebuild is not the very file) ``transcode_refused`` says why
        and the pixels are coded instead, with alpha, EXIF and XMP."""
        _check_image(self.name, image)
        refused = None
        if extras.source_format == "JPEG" and extras.source:
            try:
                return self._transcode(bytes(extras.source), image)
            except CodecError as e:
                refused = str(e)
        prepared = _prepare_pixels(self.name, image, extras, self.embeds)
        prepared.transcode_refused = refused
        return prepared

    def _transcode(self, jpeg: bytes, image: np.ndarray) -> JxlPrepared:
        h, w = image.shape[:2]
        with _open_jpeg(self.name, jpeg) as im:
            if _oriented_size(im) != (w, h):
                raise CodecError(f"{self.name}: the source JPEG is {im.size[0]}x{im.size[1]} turned "
                                 f"{'x'.join(map(str, _oriented_size(im)))}, its pixels {w}x{h}")
            jw, jh = im.size
        Encoder, Decoder = _libjxl()
        enc = _guarded(self.name, "encoder refused its settings", Encoder, mode="RGB", lossless=True,
                       quality=100.0, decoding_speed=0, effort=self.effort, use_container=True,
                       use_original_profile=True, num_threads=self.num_threads)
        jxl = _guarded(self.name, "libjxl cannot transcode this JPEG", enc, jpeg, jw, jh, jpeg_encode=True)
        is_jpeg, _info, rebuilt, _icc, _boxes = _guarded(self.name, "transcode does not decode",
                                                          Decoder(num_threads=self.num_threads), jxl)
        if not is_jpeg or rebuilt != jpeg:
            raise CodecError(f"{self.name}: libjxl's transcode does not rebuild the JPEG byte for byte")
        return JxlPrepared(width=w, height=h, transcoded=jxl)

    def encode(self, prepared: JxlPrepared, value: float) -> bytes:
        if prepared.transcoded is not None:
            return prepared.transcoded
        return self._encode_pixels(prepared, 100.0, lossless=True)

    def original_of(self, payload: bytes) -> bytes | None:
        """The transcoded JPEG, byte for byte; None for a pixel encode (a file without JPEG
        reconstruction data, found without decoding it)."""
        if payload[:12] != _CONTAINER_SIGNATURE:
            if payload[:2] == _CODESTREAM_SIGNATURE:
                return None
            raise CodecError(f"not a JPEG XL file ({len(payload)} bytes, starts {bytes(payload[:12])!r})")
        if not any(kind == b"jbrd" for kind, _ in _boxes(payload)):
            return None
        _, Decoder = _libjxl()
        is_jpeg, _info, data, _icc, _b = _guarded(self.name, "payload does not decode",
                                                  Decoder(num_threads=self.num_threads), payload)
        return bytes(data) if is_jpeg else None



def jxl(effort: int = DEFAULT_EFFORT, decoding_speed: int = 0, num_threads: int = -1) -> JxlCodec:
    if decoding_speed not in range(5):
        raise CodecError(f"jxl decoding_speed must be 0..4, got {decoding_speed!r}")
    return JxlCodec(effort=_check_effort(effort), decoding_speed=decoding_speed, num_threads=num_threads)


def jxl_lossless(effort: int = DEFAULT_EFFORT, num_threads: int = -1) -> JxlLosslessCodec:
    return JxlLosslessCodec(effort=_check_effort(effort), num_threads=num_threads)


jxl.capabilities = JXL_CAPS                    # type: ignore[attr-defined]
jxl_lossless.capabilities = JXL_LOSSLESS_CAPS  # type: ignore[attr-defined]

CODECS = {"jxl": jxl, "jxl-lossless": jxl_lossless}   # named in registry._BUILTIN
