"""Classical codecs through Pillow: JPEG (4:2:0), WebP and AVIF (libavif).

Their rate-control value is Pillow's integer ``quality`` (0..100, higher = more bits).
They have no rate model, so ``estimate`` returns None and rate control searches with real
encodes. Payloads are the codec's own file bytes, so a payload can also be cut out of the
container and opened by any image viewer.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ratefit.codecs.base import Capabilities, CodecError, ControlRange


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

    def prepare(self, image: np.ndarray) -> Image.Image:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise CodecError(f"{self.name} expects uint8 HxWx3, got {image.dtype} {image.shape}")
        return Image.fromarray(image, "RGB")

    def estimate(self, prepared: Image.Image, value: float) -> float | None:
        return None

    def encode(self, prepared: Image.Image, value: float) -> bytes:
        buf = io.BytesIO()
        prepared.save(buf, format=self.format, quality=int(round(value)), **self.save_options)
        return buf.getvalue()

    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # the size check below decides
                with Image.open(io.BytesIO(payload), formats=[self.format]) as im:
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


def jpeg(**options) -> PillowCodec:
    opts = {"subsampling": "4:2:0", "optimize": True, **options}
    return PillowCodec("jpeg", "JPEG", "jpg.rfic", save_options=opts)


def webp(**options) -> PillowCodec:
    opts = {"method": 6, **options}
    return PillowCodec("webp", "WEBP", "webp.rfic", save_options=opts, speed="medium")


def avif(**options) -> PillowCodec:
    opts = {"speed": 6, "subsampling": "4:2:0", **options}
    return PillowCodec("avif", "AVIF", "avif.rfic", save_options=opts, speed="medium")


for _factory in (jpeg, webp, avif):   # declared on the factories, so a driver asks without building one
    _factory.capabilities = Capabilities(preferred_device="cpu")   # type: ignore[attr-defined]

CODECS = {"jpeg": jpeg, "webp": webp, "avif": avif}   # named in registry._BUILTIN
