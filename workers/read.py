"""Read and decode one input into 8-bit RGB plus what travels beside it (alpha, metadata).

Policy, in one place (the README repeats it):
* the pixel limit is checked from the header, before any pixel is decoded;
* EXIF orientation is applied, so the output looks as viewers show the input; the EXIF that
  travels says orientation 1 (patched in place: every other byte of it is kept);
* grayscale, palette, CMYK and 16-bit images become 8-bit RGB (16-bit is scaled, not clipped);
  CMYK and grayscale inputs with an ICC profile are converted to sRGB through it;
* an RGB ICC profile travels with the pixels (``keep_icc``), or the pixels are converted to
  sRGB through it (littleCMS, Pillow's ImageCms) and it is dropped;
* alpha (RGBA, LA, palette with transparency) is kept as its own plane; the colour is left
  unmatted (``matted()`` gives what a viewer shows on a white page, for codecs without alpha);
  an alpha that is opaque everywhere is no alpha;
* EXIF and XMP travel unless ``keep_metadata`` is off (``--strip-metadata``);
* animated images (GIF, WebP, APNG) are compressed from their first frame.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from ratefit.codecs.base import NO_EXTRAS, Extras
from ratefit.codecs.pillow import exif_orientation_1
from ratefit.workers.storage import StorageUnavailable, fetch, fetch_range, open_fs

DEFAULT_MAX_PIXELS = 100_000_000
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ItemError(Exception):
    """One item failed at one stage; becomes a manifest row, never a job failure."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


@dataclass
class DecodedImage:
    pixels: np.ndarray   # uint8 HxWx3, unmatted colour where the input has alpha
    original_mode: str
    frames: int = 1
    extras: Extras = field(default_factory=lambda: NO_EXTRAS)
    format: str | None = None        # Pillow's name for the input's format ("JPEG", "PNG", ...)
    sha256: str | None = None        # of the input file (read_image)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    def matted(self) -> np.ndarray:
        """The colour composited onto white by the alpha: what a viewer shows on a white page."""
        alpha = self.extras.alpha
        if alpha is None:
            return self.pixels
        a = alpha.astype(np.float32)[:, :, None] / 255.0
        out = self.pixels.astype(np.float32) * a + 255.0 * (1.0 - a)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _gray_to_rgb8(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.size and arr.max() > 255):
        arr = arr * (255.0 / 65535.0)
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _split_alpha(im: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """(colour image, alpha plane or None): the alpha of RGBA, LA, PA and transparent palettes."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode not in _ALPHA_MODES:
        return im, None
    if im.mode in ("LA", "La"):
        la = im.convert("LA")
        alpha = np.asarray(la.getchannel("A"), dtype=np.uint8)
        colour = la.getchannel("L")
    else:
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.uint8)
        colour = rgba.convert("RGB")
    return colour, (None if bool(np.all(alpha == 255)) else np.ascontiguousarray(alpha))


_SRGB = None


def _srgb_profile():
    global _SRGB
    if _SRGB is None:
        _SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB


def icc_space(icc: bytes | None) -> str | None:
    """The colour space an ICC profile describes ("RGB", "GRAY", "CMYK", ...), from its header."""
    if not icc or len(icc) < 20:
        return None
    return icc[16:20].decode("ascii", "replace").strip()


def _to_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """``im`` (in the colour space of ``icc``) converted to sRGB RGB through littleCMS."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.profileToProfile(im, source, _srgb_profile(), outputMode="RGB")


def _colour(im: Image.Image, icc: bytes | None, keep_icc: bool) -> tuple[np.ndarray, bytes | None]:
    """8-bit RGB pixels and the profile they are in (None: sRGB, or unknown and left as is)."""
    space = icc_space(icc)
    mode = im.mode
    try:
        if mode == "CMYK" and space == "CMYK":
            return np.asarray(_to_srgb(im, icc), dtype=np.uint8), None
        if mode in ("L", "LA") and space == "GRAY":
            return np.asarray(_to_srgb(im.convert("L"), icc), dtype=np.uint8), None
    except (ImageCms.PyCMSError, OSError, ValueError):
        icc = None   # a broken profile: the plain conversion below, and no profile travels
    if mode.startswith("I;16") or mode in ("I", "F"):
        rgb = _gray_to_rgb8(im)
    else:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if space != "RGB" or icc is None:
        return np.ascontiguousarray(rgb), None
    if keep_icc:
        return np.ascontiguousarray(rgb), icc
    try:
        return np.ascontiguousarray(np.asarray(_to_srgb(Image.fromarray(rgb, "RGB"), icc), dtype=np.uint8)), None
    except (ImageCms.PyCMSError, OSError, ValueError):
        return np.ascontiguousarray(rgb), None


def _xmp_of(im: Image.Image) -> bytes | None:
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return bytes(xmp) if xmp else None


def composite_on_white(pixels: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """``pixels`` as a viewer shows them on a white page (for outputs that cannot keep alpha)."""
    return DecodedImage(pixels, "RGB", extras=Extras(alpha=alpha)).matted()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, keep_icc: bool = True,
                 keep_metadata: bool = True) -> DecodedImage:
    """Decode image bytes under the pixel limit; raises ItemError naming what was wrong.

    ``keep_icc`` off: an RGB profile's pixels are converted to sRGB and the profile dropped
    (``--srgb``, or an output that cannot carry one). ``keep_metadata`` off: EXIF and XMP are
    dropped (``--strip-metadata``).
    """
    if len(data) == 0:
        raise ItemError("decode", "file is empty (0 bytes)")
    # ratefit applies its own limit (max_pixels) from the header, with a message that says
    # how to raise it; Pillow's fixed bomb check would refuse first with other numbers.
    Image.MAX_IMAGE_PIXELS = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ItemError("decode", f"not a recognised image format ({len(data)} bytes, starts {data[:8]!r})") from None
        except Image.DecompressionBombError as e:
            raise ItemError("decode", f"refused before decoding: {e}") from None
        except Exception as e:
            raise ItemError("decode", f"unreadable image header: {type(e).__name__}: {e}") from None
        with im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ItemError("decode", f"image header claims an empty size {w}x{h}")
            if w * h > max_pixels:
                raise ItemError("decode", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                                          f"(refused before decoding; raise --max-pixels to allow it)")
            frames = int(getattr(im, "n_frames", 1) or 1)
            mode = im.mode
            fmt = im.format
            try:
                im.seek(0)
                im.load()
            except Exception as e:
                raise ItemError("decode", f"{im.format or 'image'} data is corrupt or truncated: {e}") from None
            icc = im.info.get("icc_profile") or None
            exif = exif_orientation_1(im.info.get("exif")) if keep_metadata else None
            xmp = _xmp_of(im) if keep_metadata else None
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception:
                oriented = im   # a broken EXIF block must not lose an otherwise good image
            try:
                colour, alpha = _split_alpha(oriented)
                pixels, icc = _colour(colour, icc, keep_icc)
            except Exception as e:
                raise ItemError("decode", f"cannot convert {mode} to RGB: {e}") from None
    extras = Extras(alpha=alpha, icc=icc, exif=exif, xmp=xmp)
    return DecodedImage(pixels=pixels, original_mode=mode, frames=frames, extras=extras, format=fmt)


def read_bytes(fs, path: str, offset: int | None = None, length: int | None = None) -> bytes:
    """An object's bytes (or ``length`` of them from ``offset``); a failure is an ItemError at ``read``."""
    try:
        return fetch(fs, path) if offset is None else fetch_range(fs, path, offset, length or 0)
    except StorageUnavailable:
        raise   # not this item's fault: the shard stops and the job reports the outage
    except FileNotFoundError:
        raise ItemError("read", f"not found: {path}") from None
    except Exception as e:
        raise ItemError("read", f"{type(e).__name__}: {e}") from None


def read_quality_map(url: str, storage_options: dict | None, height: int, width: int):
    """A PNG quality map for an image of ``height`` x ``width`` (float32 in [0, 1])."""
    from ratefit.codecs.qmap import QmapError, load_png

    try:
        fs, path = open_fs(url, storage_options)
        data = fetch(fs, path)
    except StorageUnavailable:
        raise
    except FileNotFoundError:
        raise ItemError("qmap", f"quality map not found: {url}") from None
    except Exception as e:
        raise ItemError("qmap", f"{url}: {type(e).__name__}: {e}") from None
    try:
        return load_png(data, height, width, url)
    except QmapError as e:
        raise ItemError("qmap", str(e)) from None


def read_image(item, storage_options: dict | None, max_pixels: int, *, keep_icc: bool = True,
               keep_metadata: bool = True, keep_source: bool = False) -> tuple[DecodedImage, int]:
    """Fetch and decode one planned item: (image, input bytes). Raises ItemError naming the stage.

    ``keep_source``: the input file's bytes ride along in ``image.extras.source`` (for a codec
    that transcodes the file itself losslessly).
    """
    if item.error:
        raise ItemError("plan", item.error)
    try:
        in_fs, in_path = open_fs(item.uri, storage_options)
    except Exception as e:
        raise ItemError("read", f"{type(e).__name__}: {e}") from None
    data = read_bytes(in_fs, in_path)
    image = decode_image(data, max_pixels, keep_icc=keep_icc, keep_metadata=keep_metadata)
    image.sha256 = hashlib.sha256(data).hexdigest()
    if keep_source:
        image.extras = dataclasses.replace(image.extras, source=data, source_format=image.format)
    return image, len(data)
