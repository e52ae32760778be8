"""Classical codecs through Pillow: JPEG (4:2:0), WebP and AVIF (libavif).

Their rate-control value is Pillow's integer ``quality`` (0..100, higher = more bits).
They have no rate model, so ``estimate`` returns None and rate control searches with real
encodes. They are *plain-file* codecs (``Capabilities.plain_file``): a payload is the format's
own file (``.jpg``, ``.webp``, ``.avif``), stored as is, which any image viewer opens. What
each format carries natively (``embeds``) goes into that file, so the rate search counts it:

========  =====  ===  ====  ===
codec     alpha  icc  exif  xmp
========  =====  ===  ====  ===
jpeg       --    yes  yes   yes
webp      yes    yes  yes   yes
avif      yes    yes  yes   yes
========  =====  ===  ====  ===

(checked with Pillow 13: each saver takes ``icc_profile=``, ``exif=`` and ``xmp=`` and
``Image.open(...).info`` gives them back). ``extras_of(payload)`` reads them back with plain
Pillow. Older outputs held the same file bytes inside an RFIC container; ``decode`` works on
the file bytes either way.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ratefit.codecs.base import NO_EXTRAS, Capabilities, CodecError, ControlRange, Extras


def image_with_extras(pixels: np.ndarray, extras: Extras = NO_EXTRAS) -> Image.Image:
    """A decoded picture as a PIL image: RGB, or RGBA with the kept alpha, carrying the ICC
    profile, EXIF and XMP in ``info`` (how Pillow itself presents them). One assembly for the
    PNGs ``ratefit decompress`` writes and the images the reading API yields."""
    if extras.alpha is not None:
        im = Image.fromarray(np.dstack([pixels, extras.alpha]), "RGBA")
    else:
        im = Image.fromarray(pixels, "RGB")
    for name, value in (("icc_profile", extras.icc), ("exif", extras.exif), ("xmp", extras.xmp)):
        if value:
            im.info[name] = value
    return im

EXIF_PREFIX = b"Exif\x00\x00"


@dataclass
class PillowPrepared:
    """What ``encode`` needs for one image: the picture (RGB, or RGBA with the alpha) and the
    keyword arguments of Pillow's ``save`` besides ``quality`` (metadata, per-image options)."""

    image: Image.Image
    save: dict[str, Any] = field(default_factory=dict)


@dataclass
class PillowCodec:
    name: str
    format: str
    extension: str
    control: ControlRange = field(default_factory=lambda: ControlRange("quality", 0, 100, increasing=True, discrete=True))
    save_options: dict = field(default_factory=dict)
    weights_sha256: bytes = b""
    device: str = "cpu"
    speed: str = "fast"
    capabilities: Capabilities = field(default_factory=lambda: Capabilities(preferred_device="cpu"))

    @property
    def embeds(self) -> frozenset[str]:
        return self.capabilities.embeds

    def prepare(self, image: np.ndarray, extras: Extras = NO_EXTRAS) -> PillowPrepared:
        """``image`` uint8 HxWx3; of ``extras`` the parts this format embeds go into the file."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise CodecError(f"{self.name} expects uint8 HxWx3, got "
                             f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
        extras = extras.only(self.embeds)
        save: dict[str, Any] = {}
        alpha = _checked_alpha(self.name, extras.alpha, image.shape[:2])
        if alpha is not None:
            im = Image.fromarray(np.ascontiguousarray(np.dstack([image, alpha])), "RGBA")
            save.update(self._lossless_alpha())
        else:
            im = Image.fromarray(np.ascontiguousarray(image), "RGB")
        if extras.icc:
            save["icc_profile"] = bytes(extras.icc)
        if extras.exif:
            save["exif"] = bytes(extras.exif)
        if extras.xmp:
            save["xmp"] = bytes(extras.xmp)
        return PillowPrepared(im, save)

    def _lossless_alpha(self) -> dict[str, Any]:
        """Save options that code the alpha plane losslessly, where the format allows it.

        WebP: ``alpha_quality=100`` codes alpha losslessly (measured: exact at every quality,
        it is Pillow's default too), and ``exact=True`` keeps the colour under transparent
        pixels: without it libwebp discards that colour for a smaller file, and since ``decode``
        gives the colour channels uncomposited, the measured PSNR fell to 19 dB at any quality
        (a 256x256 Kodak crop with a disc alpha: 30.7 dB at quality 30, 41 dB at 95 with it,
        for 1.75x / 2x the bytes). AVIF: Pillow 13 has no alpha-quality option of its own and
        by default codes alpha at the colour's quality (measured max alpha error 145 levels at
        quality 10, 25 at 50, 4 at 90); libaom's codec-specific option ``a:lossless=1``, passed
        through ``advanced``, makes the alpha plane lossless (measured max error 0 at qualities
        10, 50 and 90, for noise and ramp alphas). It exists only for the aom encoder; with
        another AV1 encoder (rav1e, SVT) alpha stays lossy at the colour's quality.
        """
        if self.format == "WEBP":
            return {"alpha_quality": 100, "exact": True}
        if self.format == "AVIF" and self.save_options.get("codec", "auto") in ("auto", "aom"):
            try:
                from PIL import _avif

                if not _avif.encoder_codec_available("aom"):
                    return {}
            except ImportError:
                return {}
            advanced = dict(self.save_options.get("advanced") or {})
            advanced.setdefault("a:lossless", "1")
            return {"advanced": advanced}
        return {}

    def estimate(self, prepared: PillowPrepared, value: float) -> float | None:
        return None

    def encode(self, prepared: PillowPrepared | Image.Image, value: float) -> bytes:
        """The format's file at quality ``value``, metadata and alpha included."""
        if isinstance(prepared, Image.Image):   # prepared by an older caller: the picture alone
            prepared = PillowPrepared(prepared)
        buf = io.BytesIO()
        try:
            prepared.image.save(buf, format=self.format, quality=int(round(value)),
                                **{**self.save_options, **prepared.save})
        except (ValueError, OSError) as e:   # e.g. EXIF or XMP over JPEG's 64 KiB marker limit
            raise CodecError(f"{self.name} cannot write this image: {type(e).__name__}: {e}") from e
        return buf.getvalue()

    def _open(self, payload: bytes) -> Image.Image:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # callers check the size
            return Image.open(io.BytesIO(payload), formats=[self.format])

    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
        """The colour channels (RGB uint8 HxWx3; an RGBA file's alpha is not composited)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # the size check below decides
                with self._open(payload) as im:
                    # The payload's own header is checked before any pixel is decoded: a
                    # forged payload claiming a huge size must not allocate it.
                    if im.size != (width, height):
                        raise CodecError(f"{self.name} payload is {im.size[0]}x{im.size[1]}, "
                                         f"container header says {width}x{height}")
                    im.load()
                    rgb = np.asarray(im.convert("RGB"))
        except CodecError:
            raise
        except Exception as e:  # Pillow raises many types for corrupt data
            raise CodecError(f"{self.name} payload does not decode: {type(e).__name__}: {e}") from e
        return rgb

    def extras_of(self, payload: bytes) -> Extras:
        """What the file carries beside its colour, read back with plain Pillow.

        ``alpha`` is None when the file has none or it is fully opaque; ``exif`` starts with
        ``Exif\\0\\0`` (WebP's reader gives the bare TIFF structure). The alpha plane is only
        decoded when the file has one; the header's size is not checked here (``decode`` is
        the size-checked path, and callers run it first).
        """
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with self._open(payload) as im:
                    info = dict(im.info)
                    alpha = None
                    if "alpha" in self.embeds and "A" in im.getbands():
                        im.load()
                        alpha = opaque_to_none(np.asarray(im.getchannel("A")))
        except Exception as e:
            raise CodecError(f"{self.name} payload does not decode: {type(e).__name__}: {e}") from e
        return Extras(alpha=alpha, icc=info.get("icc_profile") or None, exif=exif_with_prefix(info.get("exif")),
                      xmp=xmp_bytes(info.get("xmp") or info.get("XML:com.adobe.xmp")))


def _checked_alpha(name: str, alpha: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    if alpha is None:
        return None
    alpha = np.asarray(alpha)
    if alpha.dtype != np.uint8 or alpha.shape != tuple(shape):
        raise CodecError(f"{name} expects a uint8 {shape[0]}x{shape[1]} alpha plane, got {alpha.dtype} {alpha.shape}")
    return alpha


def opaque_to_none(alpha: np.ndarray) -> np.ndarray | None:
    """``alpha`` (uint8 HxW, copied), or None when it is fully opaque."""
    return None if bool(np.all(alpha == 255)) else np.array(alpha, dtype=np.uint8)


def exif_with_prefix(exif: bytes | None) -> bytes | None:
    """EXIF as ``Exif\\0\\0`` + TIFF structure (readers differ on the prefix), None when empty."""
    if not exif:
        return None
    exif = bytes(exif)
    return exif if exif.startswith(EXIF_PREFIX) else EXIF_PREFIX + exif


def exif_orientation_1(exif: bytes | None) -> bytes | None:
    """EXIF with its orientation set to 1 in place, every other byte kept (patching the one value
    keeps maker notes and offsets intact, which re-serialising the tags would not): the pixels
    it goes with are already turned as the orientation said. The one implementation: the
    worker's reader and the JPEG XL codecs use it."""
    if not exif:
        return None
    data = bytearray(exif_with_prefix(exif))
    tiff = len(EXIF_PREFIX)
    order = bytes(data[tiff:tiff + 2])
    if order not in (b"II", b"MM"):
        return bytes(data)
    end = "<" if order == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(end + "I", data, tiff + 4)
        (count,) = struct.unpack_from(end + "H", data, tiff + ifd)
        for i in range(count):
            at = tiff + ifd + 2 + 12 * i
            tag, kind, n = struct.unpack_from(end + "HHI", data, at)
            if tag == 0x0112 and kind == 3 and n == 1:
                struct.pack_into(end + "H", data, at + 8, 1)
                break
    except struct.error:
        pass
    return bytes(data)


def xmp_bytes(xmp: bytes | str | None) -> bytes | None:
    if not xmp:
        return None
    return xmp.encode("utf-8") if isinstance(xmp, str) else bytes(xmp)


_FULL = frozenset({"alpha", "icc", "exif", "xmp"})
_CAPS = {
    # JPEG has no alpha channel: the worker mattes or drops it (and says so).
    "jpeg": Capabilities(preferred_device="cpu", plain_file=True, embeds=frozenset({"icc", "exif", "xmp"})),
    "webp": Capabilities(preferred_device="cpu", plain_file=True, embeds=_FULL),
    "avif": Capabilities(preferred_device="cpu", plain_file=True, embeds=_FULL),
}


def jpeg(**options) -> PillowCodec:
    opts = {"subsampling": "4:2:0", "optimize": True, **options}
    return PillowCodec("jpeg", "JPEG", "jpg", save_options=opts, capabilities=_CAPS["jpeg"])


def webp(**options) -> PillowCodec:
    opts = {"method": 6, **options}
    return PillowCodec("webp", "WEBP", "webp", save_options=opts, speed="medium", capabilities=_CAPS["webp"])


def avif(**options) -> PillowCodec:
    opts = {"speed": 6, "subsampling": "4:2:0", **options}
    return PillowCodec("avif", "AVIF", "avif", save_options=opts, speed="medium", capabilities=_CAPS["avif"])


for _factory in (jpeg, webp, avif):   # declared on the factories, so a driver asks without building one
    _factory.capabilities = _CAPS[_factory.__name__]   # type: ignore[attr-defined]

CODECS = {"jpeg": jpeg, "webp": webp, "avif": avif}   # named in registry._BUILTIN
