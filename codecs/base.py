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

    @property
    def lowest_rate(self) -> float:
        return self.low if self.increasing else self.high

    @property
    def highest_rate(self) -> float:
        return self.high if self.increasing else self.low


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
    per quality (CompressAI's fixed-rate zoo models) names, per payload, the network that
    wrote it, through ``weights_sha256_of(payload)``: a decoder then refuses a container
    unless it holds that very network.
    """
    of = getattr(codec, "weights_sha256_of", None)
    return of(payload) if of is not None else codec.weights_sha256
