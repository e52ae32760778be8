"""The codec interface every ratefit codec implements, classical or learned.

A codec exposes one scalar *rate-control value* (JPEG quality, a learned model's gain
interpolation, a quantisation step, ...). Rate control (``rate.py``) only ever talks to
codecs through this interface, so a new codec gets per-item targets for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


class CodecError(Exception):
    """A codec could not encode or decode; the message names what was wrong."""


@dataclass(frozen=True)
class ControlRange:
    """The domain of a codec's rate-control value.

    ``increasing`` says whether a larger value means more bits (true for quality scales).
    ``discrete`` codecs only accept integer values in ``[low, high]``; continuous codecs
    accept any real value there, which lets the search land arbitrarily close to a target.
    """

    name: str
    low: float
    high: float
    increasing: bool = True
    discrete: bool = False

    def clamp(self, value: float) -> float:
        value = min(max(value, self.low), self.high)
        return float(round(value)) if self.discrete else float(value)


@dataclass(frozen=True)
class Capabilities:
    """What a codec can do beyond the ``Codec`` protocol, declared by the codec (a class or
    instance attribute ``capabilities``) rather than discovered: the workers, rate control,
    budgets and eval read it through ``capabilities_of``. A codec that declares nothing (a
    classical codec, a plugin) has none of them.
    """

    spatial: bool = False              # prepare(image, qmap) takes a per-pixel quality map in [0, 1]
    reconstruct: bool = False          # reconstruct(prepared, value): the decoder's picture, no entropy coding
    refine: bool = False               # refine(prepared, image, value, steps): latent refinement
    batch: bool = False                # prepare_batch(images): one analysis pass for images of one padded size
    progressive: bool = False          # decode_progressive(payload, w, h, value, groups): a preview from the first groups
    tiles: bool = False                # a settable ``tile`` (pixels): out-of-memory retries shrink it
    per_payload_weights: bool = False  # weights_sha256_of(payload): one network per quality, named per payload
    sweep: tuple[float, float] | None = None   # where fixed-value R-D sweeps spread (default: the whole range)
    preferred_device: str | None = None        # where it wants to run (default: its ``device``)
    # Archive fidelity (classical codecs that write standard files):
    plain_file: bool = False           # the payload is a standard image file, stored as is (no RFIC container)
    embeds: frozenset[str] = frozenset()   # what its files carry natively, of EMBEDDABLE: prepare(image,
                                       # extras=Extras) takes them, extras_of(payload) gives them back
    lossless: bool = False             # no rate control: one encode (at control.low); rate targets do not apply
    restores_original: bool = False    # original_of(payload): the input file byte for byte, or None


NONE = Capabilities()
EMBEDDABLE = frozenset({"alpha", "icc", "exif", "xmp"})


@dataclass(frozen=True)
class Extras:
    """What an image holds beside its 8-bit RGB pixels, read once by the worker (``workers/read.py``).

    The learned codecs never see it (their container carries it in sections); a codec that
    ``embeds`` some of it writes those parts into its own file and reads them back with
    ``extras_of``. ``source``/``source_format`` are the input file itself, given only to a codec
    that ``restores_original`` (lossless JPEG transcoding works on the JPEG's coefficients).
    """

    alpha: np.ndarray | None = None    # uint8 HxW; None when the input has none or it is fully opaque
    icc: bytes | None = None           # an RGB ICC profile (the pixels are in its colour space)
    exif: bytes | None = None          # b"Exif\0\0" + TIFF structure, orientation already 1
    xmp: bytes | None = None           # the XMP packet (UTF-8 XML)
    source: bytes | None = None
    source_format: str | None = None   # Pillow's name for the source's format, e.g. "JPEG"

    def only(self, parts: frozenset[str]) -> "Extras":
        """The parts named in ``parts`` (of EMBEDDABLE); the source stays."""
        return Extras(**{k: (getattr(self, k) if k in parts else None) for k in EMBEDDABLE},
                      source=self.source, source_format=self.source_format)


NO_EXTRAS = Extras()


def capabilities_of(codec: Any) -> Capabilities:
    """A codec's (or a codec factory's) declared capabilities."""
    declared = getattr(codec, "capabilities", None)
    return declared if isinstance(declared, Capabilities) else NONE


@runtime_checkable
class Codec(Protocol):
    """What rate control, the workers and the container need from a codec.

    ``prepare`` does the per-image work that does not depend on the rate (padding, an
    analysis transform) once, so the search can try many values cheaply. ``estimate``
    returns the payload size in bits from the codec's own model, or ``None`` when it has
    none (classical codecs): the search then falls back to real encodes.
    """

    name: str
    extension: str
    control: ControlRange
    weights_sha256: bytes  # b"" for codecs without weights
    device: str  # "cpu" or "cuda"
    speed: str  # "fast" | "medium" | "slow" (shown by `ratefit codecs`)

    def prepare(self, image: np.ndarray) -> Any: ...

    def estimate(self, prepared: Any, value: float) -> float | None: ...

    def encode(self, prepared: Any, value: float) -> bytes: ...

    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray: ...


def payload_weights_sha256(codec: Codec, payload: bytes) -> bytes:
    """The weights identity a container of ``payload`` carries.

    Most codecs have one set of weights (``weights_sha256``). A codec holding one network
    per quality (CompressAI's fixed-rate zoo models, ``per_payload_weights``) names, per
    payload, the network that wrote it, through ``weights_sha256_of(payload)``: a decoder then
    refuses a container unless it holds that very network.
    """
    if capabilities_of(codec).per_payload_weights:
        return codec.weights_sha256_of(payload)
    return codec.weights_sha256
