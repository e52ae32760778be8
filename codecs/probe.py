"""Rate–distortion probes: what one image costs and looks like at a few rate-control values.

A budget job needs each image's R-D curve before it can spread the budget. Probing must be
cheap, so a codec with a rate model and a decoder-free reconstruction (the learned codecs:
``estimate`` + ``reconstruct``) is probed without entropy coding; a codec without them (the
classical ones) is probed with real encodes and decodes. Both give stored bytes (container
header included) and PSNR, through this one function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ratefit.codecs.base import Codec, ControlRange, capabilities_of
from ratefit.codecs.metrics import psnr

DEFAULT_PROBES_CONTINUOUS = 10
DEFAULT_PROBES_DISCRETE = 12


@dataclass(frozen=True)
class ProbePoint:
    value: float
    stored_bytes: float   # predicted size of the stored file, container header included
    psnr: float
    exact: bool           # True when the size comes from a real encode


def probe_values(control: ControlRange, count: int | None = None,
                 sweep: tuple[float, float] | None = None) -> list[float]:
    """``count`` control values spread evenly over the codec's range (integers for discrete codecs).

    Even spacing in the control value is roughly even in log-rate for the codecs here, which
    is where the curve bends; the ends are always included so the plan knows each image's range.
    A codec whose range reaches far past where it is efficient names a narrower ``sweep``
    (``gain-hyperprior``: its trained levels and one beyond): the ``count`` values spread over
    that, and the range's two ends come on top, so the spacing where the plan allocates stays
    as fine as before the range grew.
    """
    count = count or (DEFAULT_PROBES_DISCRETE if control.discrete else DEFAULT_PROBES_CONTINUOUS)
    if count < 2:
        raise ValueError(f"need at least 2 probes per image, got {count}")
    if sweep is not None and not control.discrete:
        inner = np.linspace(max(sweep[0], control.low), min(sweep[1], control.high), count)
        values = np.unique(np.concatenate([[control.low], inner, [control.high]]))
    else:
        values = np.linspace(control.low, control.high, count)
    if control.discrete:
        values = np.unique(np.round(values))
    return [float(v) for v in values]


def probe(codec: Codec, prepared: Any, image: np.ndarray, value: float, overhead: int) -> ProbePoint:
    """Size and PSNR of ``image`` at ``value``; ``overhead`` is the container header size."""
    bits = codec.estimate(prepared, value) if capabilities_of(codec).reconstruct else None
    if bits is not None:
        rec = codec.reconstruct(prepared, value)
        return ProbePoint(value, math.ceil(bits / 8.0) + overhead, _finite_psnr(image, rec), exact=False)
    payload = codec.encode(prepared, value)
    h, w = image.shape[:2]
    rec = codec.decode(payload, w, h, value)
    return ProbePoint(value, float(len(payload) + overhead), _finite_psnr(image, rec), exact=True)


def _finite_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR capped at 100 dB: a lossless probe must still sort above lossy ones, not be inf."""
    return min(psnr(a, b), 100.0)
