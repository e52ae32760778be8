"""Read and decode one input into 8-bit RGB, the form every codec takes.

Policy, in one place (the README repeats it):
* the pixel limit is checked from the header, before any pixel is decoded;
* EXIF orientation is applied, so the output looks as viewers show the input;
* grayscale, palette, CMYK and 16-bit images become 8-bit RGB (16-bit is scaled, not clipped);
* alpha is composited onto white (what a viewer shows on a white page) and then dropped;
* animated images (GIF, WebP, APNG) are compressed from their first frame.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ratefit.workers.storage import StorageUnavailable, fetch, open_fs

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
    pixels: np.ndarray   # uint8 HxWx3
    original_mode: str
    frames: int = 1

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def _to_rgb8(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            arr = arr * (255.0 / 65535.0)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "PA":
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode image bytes under the pixel limit; raises ItemError naming what was wrong."""
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
            try:
                im.seek(0)
                im.load()
            except Exception as e:
                raise ItemError("decode", f"{im.format or 'image'} data is corrupt or truncated: {e}") from None
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception:
                oriented = im   # a broken EXIF block must not lose an otherwise good image
            try:
                pixels = _to_rgb8(oriented)
            except Exception as e:
                raise ItemError("decode", f"cannot convert {mode} to RGB: {e}") from None
    return DecodedImage(pixels=pixels, original_mode=mode, frames=frames)


def read_bytes(fs, path: str) -> bytes:
    try:
        return fetch(fs, path)
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


def read_image(item, storage_options: dict | None, max_pixels: int) -> tuple[DecodedImage, int]:
    """Fetch and decode one planned item: (image, input bytes). Raises ItemError naming the stage."""
    if item.error:
        raise ItemError("plan", item.error)
    try:
        in_fs, in_path = open_fs(item.uri, storage_options)
    except Exception as e:
        raise ItemError("read", f"{type(e).__name__}: {e}") from None
    data = read_bytes(in_fs, in_path)
    return decode_image(data, max_pixels), len(data)
