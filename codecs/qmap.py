"""Quality maps: where inside an image the bits should go.

A quality map is a float array ``q`` (H x W, values in [0, 1]; 1 = the best quality the
item's target allows, 0 = the least). It comes from a grayscale PNG (``qmap_uri`` in a
listing, or a folder parallel to the input) or from a built-in generator. The spatial codec
(``gain-hyperprior-roi``) reduces it to a coarse grid of ``MAP_LEVELS`` steps, one cell per
``CELL`` pixels, which travels in the bitstream so the decoder needs no map of its own.

The manifest's inside/outside PSNR splits pixels at ``ROI_THRESHOLD``.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

GENERATORS = ("uniform", "center", "saliency", "faces", "text")
ROI_THRESHOLD = 0.5    # pixels with q >= this are "inside" the high-quality region
CELL = 32              # pixels per grid cell in the bitstream (two latent positions)
MAP_LEVELS = 16        # quality steps the grid keeps (4 bits of information per cell)
_GRID = struct.Struct("<HHH")   # rows, cols, length of the zlib'd cells


class QmapError(ValueError):
    """A quality map could not be made or read; the message says which and why."""


# ------------------------------------------------------------------ generators

def generate(name: str, pixels: np.ndarray) -> np.ndarray:
    """The map generator ``name`` applied to an RGB uint8 image (H x W x 3)."""
    h, w = pixels.shape[:2]
    if name == "uniform":
        return np.ones((h, w), np.float32)
    if name == "center":
        return center_map(h, w)
    if name == "saliency":
        return saliency_map(pixels)
    if name == "faces":
        return faces_map(pixels)
    if name == "text":
        raise QmapError("qmap 'text': no text detector on PyPI runs without downloading a model at run "
                        "time, so ratefit ships none; give a map per image as a PNG instead "
                        "(a qmap_uri column in the listing, or --qmap FOLDER)")
    raise QmapError(f"unknown qmap generator {name!r}; built-in: {', '.join(GENERATORS)} "
                    f"(or a folder URL holding one PNG per input)")


def center_map(height: int, width: int) -> np.ndarray:
    """An ellipse around the centre: 1 out to 0.5 of the half-axes, falling to 0 at 0.8.

    The high-quality region (q >= 0.5, radius 0.65) covers about a third of the frame.
    """
    y = (np.arange(height, dtype=np.float32) + 0.5) / height * 2 - 1
    x = (np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1
    r = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
    return np.clip((0.8 - r) / 0.3, 0.0, 1.0).astype(np.float32)


def saliency_map(pixels: np.ndarray, size: int = 64) -> np.ndarray:
    """Spectral-residual saliency (Hou and Zhang, CVPR 2007) on a ``size``-pixel thumbnail.

    The log amplitude spectrum minus its local average keeps what is unexpected in the
    image; back in the pixel domain (with the original phase), squared and blurred, it
    marks the regions that stand out. Scaled to [0, 1] between its least and most salient.
    """
    h, w = pixels.shape[:2]
    thumb = Image.fromarray(pixels).convert("L")
    scale = size / max(h, w)
    tw, th = max(8, round(w * scale)), max(8, round(h * scale))
    g = np.asarray(thumb.resize((tw, th), Image.Resampling.BILINEAR), np.float64)
    spectrum = np.fft.fft2(g)
    log_amp = np.log(np.abs(spectrum) + 1e-9)
    avg = _blur(log_amp, np.ones(3) / 3)
    residual = np.exp(log_amp - avg + 1j * np.angle(spectrum))
    sal = np.abs(np.fft.ifft2(residual)) ** 2
    sal = _blur(sal, _gaussian(2.5)).astype(np.float32)
    low, high = float(sal.min()), float(sal.max())
    sal = (sal - low) / (high - low) if high > low else np.ones_like(sal)
    return _resize(sal, h, w)


def faces_map(pixels: np.ndarray) -> np.ndarray:
    """1 on detected faces (boxes grown by half, soft edges), 0 elsewhere.

    Uses OpenCV's frontal-face Haar cascade, which ships inside the opencv-python-headless
    wheel (nothing is downloaded at run time). An image without faces gets a zero map,
    i.e. a uniform one: rate control still meets the item's target.
    """
    try:
        import cv2
    except ImportError:
        raise QmapError("qmap 'faces' needs OpenCV's face detector: pip install 'ratefit[roi]' "
                        "(opencv-python-headless)") from None
    h, w = pixels.shape[:2]
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    q = np.zeros((h, w), np.float32)
    for x, y, fw, fh in cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                                 minSize=(max(16, min(h, w) // 40),) * 2):
        gx, gy = fw // 4, fh // 4
        q[max(0, y - gy):y + fh + gy, max(0, x - gx):x + fw + gx] = 1.0
    if q.any():
        sigma = max(2.0, min(h, w) / 100)
        q = cv2.GaussianBlur(q, (0, 0), sigma)
    return np.clip(q, 0, 1)


def _gaussian(sigma: float) -> np.ndarray:
    x = np.arange(-int(3 * sigma), int(3 * sigma) + 1)
    k = np.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _blur(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable filtering with edge reflection (Pillow's filters take no float images)."""
    r = len(kernel) // 2
    a = np.pad(a.astype(np.float64), r, mode="reflect")
    a = np.apply_along_axis(np.convolve, 0, a, kernel, mode="valid")
    return np.apply_along_axis(np.convolve, 1, a, kernel, mode="valid")


def _resize(q: np.ndarray, height: int, width: int) -> np.ndarray:
    if q.shape == (height, width):
        return q.astype(np.float32)
    return np.asarray(Image.fromarray(q.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR),
                      np.float32)


# ------------------------------------------------------------------ PNG maps

def load_png(data: bytes, height: int, width: int, source: str = "map") -> np.ndarray:
    """A grayscale PNG (8 or 16 bit) as a map for an image of ``height`` x ``width``.

    A map of another size is resized (bilinear), so maps may be made at a lower resolution;
    a map whose aspect ratio differs by more than 2% is refused as belonging to another image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im.convert("I") if mode in ("I;16", "I;16B", "I") else im.convert("L"), np.float32)
    except Exception as e:
        raise QmapError(f"{source}: not a readable image: {type(e).__name__}: {e}") from None
    peak = 65535.0 if mode.startswith("I") else 255.0
    mh, mw = arr.shape
    if abs(mh / mw - height / width) > 0.02 * (height / width):
        raise QmapError(f"{source}: map is {mw}x{mh}, the image {width}x{height} (a different aspect ratio)")
    return _resize(np.clip(arr / peak, 0, 1), height, width)


def to_png(q: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a map (for reports and for writing maps to use later)."""
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(q, 0, 1) * 255).astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ the coded grid

def grid_shape(height: int, width: int, pad_multiple: int) -> tuple[int, int]:
    """Rows and columns of the grid over the padded image."""
    ph, pw = -(-height // pad_multiple) * pad_multiple, -(-width // pad_multiple) * pad_multiple
    return ph // CELL, pw // CELL


def to_grid(q: np.ndarray, pad_multiple: int) -> np.ndarray:
    """The map averaged over ``CELL`` x ``CELL`` cells of the padded image, in 0..MAP_LEVELS-1."""
    h, w = q.shape
    rows, cols = grid_shape(h, w, pad_multiple)
    padded = np.pad(q.astype(np.float64), ((0, rows * CELL - h), (0, cols * CELL - w)), mode="edge")
    cells = padded.reshape(rows, CELL, cols, CELL).mean(axis=(1, 3))
    return np.clip(np.round(cells * (MAP_LEVELS - 1)), 0, MAP_LEVELS - 1).astype(np.uint8)


def pack_grid(grid: np.ndarray) -> bytes:
    body = zlib.compress(np.ascontiguousarray(grid, np.uint8).tobytes(), 9)
    return _GRID.pack(grid.shape[0], grid.shape[1], len(body)) + body


def unpack_grid(data: bytes, rows: int, cols: int) -> tuple[np.ndarray, int]:
    """The grid at the start of ``data`` and the bytes it took; checks it fits the image."""
    if len(data) < _GRID.size:
        raise QmapError(f"quality map header needs {_GRID.size} bytes, {len(data)} given")
    r, c, n = _GRID.unpack_from(data)
    if (r, c) != (rows, cols):
        raise QmapError(f"quality map is {r}x{c} cells, the image needs {rows}x{cols}")
    if n > len(data) - _GRID.size:
        raise QmapError(f"quality map says {n} bytes, only {len(data) - _GRID.size} follow")
    try:
        raw = zlib.decompressobj().decompress(data[_GRID.size:_GRID.size + n], rows * cols + 1)
    except zlib.error as e:
        raise QmapError(f"quality map does not inflate: {e}") from None
    if len(raw) != rows * cols:
        raise QmapError(f"quality map inflates to {len(raw)} bytes, expected {rows * cols}")
    grid = np.frombuffer(raw, np.uint8).reshape(rows, cols)
    if int(grid.max(initial=0)) >= MAP_LEVELS:
        raise QmapError(f"quality map holds a level above {MAP_LEVELS - 1}")
    return grid, _GRID.size + n


# ------------------------------------------------------------------ metrics

def roi_mask(q: np.ndarray) -> np.ndarray:
    return q >= ROI_THRESHOLD


def region_psnr(original: np.ndarray, restored: np.ndarray, mask: np.ndarray) -> tuple[float | None, float | None]:
    """PSNR (dB, RGB) over the pixels where ``mask`` holds and where it does not (None if empty)."""
    diff = (original.astype(np.float64) - restored.astype(np.float64)) ** 2

    def over(m: np.ndarray) -> float | None:
        if not m.any():
            return None
        mse = float(diff[m].mean())
        return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)

    return over(mask), over(~mask)
