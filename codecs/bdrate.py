"""Bjøntegaard delta rate: the average bitrate difference between two R-D curves at equal quality.

The classic VCEG-M33 method: fit log(rate) as a cubic polynomial of quality for each curve,
integrate both over the quality interval they share, and report exp(mean difference) - 1.
Negative means the test curve needs fewer bits than the anchor for the same quality.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def bd_rate(anchor_rate: Sequence[float], anchor_quality: Sequence[float],
            test_rate: Sequence[float], test_quality: Sequence[float]) -> float:
    """BD-rate of ``test`` against ``anchor`` as a fraction (-0.15 = 15% fewer bits).

    Needs at least four points per curve with positive rates; returns NaN when the curves'
    quality ranges do not overlap.
    """
    ra, qa = _curve(anchor_rate, anchor_quality, "anchor")
    rt, qt = _curve(test_rate, test_quality, "test")
    lo, hi = max(qa.min(), qt.min()), min(qa.max(), qt.max())
    if not hi > lo:
        return math.nan
    pa = np.polyint(np.polyfit(qa, np.log(ra), 3))
    pt = np.polyint(np.polyfit(qt, np.log(rt), 3))
    mean_diff = ((np.polyval(pt, hi) - np.polyval(pt, lo)) - (np.polyval(pa, hi) - np.polyval(pa, lo))) / (hi - lo)
    return float(math.exp(mean_diff) - 1.0)


def _curve(rate: Sequence[float], quality: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    r, q = np.asarray(rate, dtype=float), np.asarray(quality, dtype=float)
    keep = np.isfinite(r) & np.isfinite(q) & (r > 0)
    r, q = r[keep], q[keep]
    if len(r) < 4:
        raise ValueError(f"BD-rate needs at least 4 valid points on the {what} curve, got {len(r)}")
    order = np.argsort(q)
    return r[order], q[order]
