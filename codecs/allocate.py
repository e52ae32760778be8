"""Equal-slope (Lagrangian) allocation of one rate budget over many images.

Each image comes with a few probes of its rate–quality curve (rate in bytes, quality as the
objective to maximise: PSNR for "highest mean PSNR", or minus the squared error for "lowest
total MSE"). For a slope λ every image takes the probe maximising ``quality - λ·rate``, which
is always a vertex of its upper concave hull, so no hull needs building; the total rate falls
as λ grows, and bisection on λ finds the slope at which the total fits the budget. Images
whose choice differs between the two final slopes lie on hull segments of slope ≈ λ*: they
share what is left of the budget (continuous codecs interpolate along the segment; discrete
codecs take whole steps, steepest first). Per-image floors (a minimum quality) and caps (a
maximum rate) bound each choice.

Everything is vectorised over a padded ``(items, probes)`` table: a million images with eight
probes each solve in seconds on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Allocation:
    rate: np.ndarray          # allocated bytes per item
    quality: np.ndarray       # predicted quality per item (interpolated on the hull)
    slope: float              # λ*: quality per byte at the margin
    total: float              # sum of ``rate``
    feasible: bool            # False when even the floors (or the lowest rates) exceed the budget


def allocate(rate: np.ndarray, quality: np.ndarray, budget: float, *, continuous: bool = True,
             min_quality: np.ndarray | float | None = None, max_rate: np.ndarray | float | None = None,
             iterations: int = 60, curve: str = "linear") -> Allocation:
    """Spread ``budget`` over items to maximise the summed quality.

    ``rate`` and ``quality`` are ``(n, k)`` arrays of probes (NaN where an item has fewer
    than ``k``); rates must be positive. Returns per-item allocations whose total is at most
    the budget (up to float rounding), as close to it as the probes allow.

    ``curve`` says how a continuous codec's quality runs between two probes: ``linear`` in
    rate (the hull's chords), or ``log``: linear in log-rate, the shape of PSNR against rate
    (about 6 dB per doubling). With ``log`` each image's best rate for a slope λ lies inside
    a segment (rate = b/λ where b is the segment's dB per e-fold), so images settle between
    probes instead of hopping from vertex to vertex; chords under-rate the points between
    probes by up to b·ln²(r1/r0)/8 (0.15 dB for probes 1.45x apart), which is the size of
    the gains a budget is after.
    """
    if curve not in ("linear", "log"):
        raise ValueError(f"curve must be 'linear' or 'log', got {curve!r}")
    r, q = _clean(rate, quality)
    log_curve = continuous and curve == "log"
    if log_curve:
        r, q = _sorted_by_rate(r, q)
    n = r.shape[0]
    lo_rate = np.nanmin(r, axis=1)
    hi_rate = np.nanmax(r, axis=1)
    floor = _floor_rate(r, q, min_quality, continuous, log_curve) if min_quality is not None else lo_rate
    cap = np.minimum(hi_rate, np.broadcast_to(np.asarray(max_rate, float), (n,))) if max_rate is not None else hi_rate
    floor = np.minimum(floor, cap)
    if log_curve:
        r0, r1, q0 = r[:, :-1], r[:, 1:], q[:, :-1]
        valid = np.isfinite(r1) & np.isfinite(r0) & (r1 > r0)
        b = np.where(valid, (q[:, 1:] - q0) / np.log(np.where(valid, r1 / r0, 2.0)), 0.0)
        r0v, r1v = np.where(valid, r0, 1.0), np.where(valid, r1, 1.0)

        has_segment = valid.any(axis=1)
        q0v = np.where(valid, q0, -np.inf)
        rows = np.arange(n)

    def choose(lam: float) -> np.ndarray:
        if log_curve and lam > 0:
            # Segments include their end points, so the probes themselves are candidates too.
            inner = np.clip(b / lam, r0v, r1v)   # each segment's best point for this slope
            seg = q0v + b * np.log(inner / r0v) - lam * inner
            pick = np.where(has_segment, inner[rows, np.argmax(seg, axis=1)], lo_rate)
        else:
            score = np.where(np.isnan(r), -np.inf, q - lam * r)
            pick = r[np.arange(n), np.argmax(score, axis=1)]
        return np.clip(pick, floor, cap)

    if floor.sum() > budget:
        return _result(r, q, floor, np.nan, False, continuous, log_curve)
    if cap.sum() <= budget:
        return _result(r, q, cap, 0.0, True, continuous, log_curve)
    # Bracket: at slope 0 everyone takes their best quality; a steep enough slope takes the
    # least rate everywhere, whose total (the floors) fits.
    lam_lo, lam_hi = 0.0, 1.0
    while choose(lam_hi).sum() > budget:
        lam_lo, lam_hi = lam_hi, lam_hi * 4
    for _ in range(iterations):
        mid = 0.5 * (lam_lo + lam_hi)
        if choose(mid).sum() > budget:
            lam_lo = mid
        else:
            lam_hi = mid
    below, above = choose(lam_hi), choose(lam_lo)   # totals: below ≤ budget < above
    spare = budget - below.sum()
    extra = above - below
    moving = extra > 0
    if continuous and extra[moving].sum() > 0:
        alloc = below + extra * min(1.0, spare / extra[moving].sum())
    else:
        alloc = below.copy()
        order = np.flatnonzero(moving)[np.argsort(extra[moving], kind="stable")]   # smallest steps first: fill tightly
        take = order[np.cumsum(extra[order]) <= spare]
        alloc[take] = above[take]
    return _result(r, q, alloc, 0.5 * (lam_lo + lam_hi), True, continuous, log_curve)


def quality_at(rate: np.ndarray, quality: np.ndarray, at: np.ndarray, *, continuous: bool = True,
               curve: str = "linear") -> np.ndarray:
    """Each item's quality at a given rate on its probe curve (e.g. what a uniform split would buy).

    Rates below an item's lowest probe are read at that probe.
    """
    r, q = _clean(rate, quality)
    at = np.maximum(np.asarray(at, float), np.nanmin(r, axis=1))
    return _hull_quality(r, q, at, continuous, continuous and curve == "log")


def _sorted_by_rate(r: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(np.where(np.isnan(r), np.inf, r), axis=1)
    return np.take_along_axis(r, order, axis=1), np.take_along_axis(q, order, axis=1)


def _clean(rate: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rate, dtype=float)
    q = np.asarray(quality, dtype=float)
    if r.ndim != 2 or r.shape != q.shape:
        raise ValueError(f"rate and quality must be (items, probes) arrays of one shape, got {r.shape} and {q.shape}")
    bad = ~(np.isfinite(r) & np.isfinite(q)) | (r <= 0)
    r, q = np.where(bad, np.nan, r), np.where(bad, np.nan, q)
    empty = np.all(np.isnan(r), axis=1)
    if empty.any():
        raise ValueError(f"items without a usable probe: {np.flatnonzero(empty)[:10].tolist()}")
    return r, q


def _hull_quality(r: np.ndarray, q: np.ndarray, at: np.ndarray, continuous: bool,
                  log_curve: bool = False) -> np.ndarray:
    """Quality at rate ``at`` per item: the best probe at or below it, or the line between
    the best probes either side of it for continuous codecs (in log-rate with ``log_curve``)."""
    n = r.shape[0]
    le = np.where(r <= at[:, None] * (1 + 1e-12), q, -np.inf)
    best_le = np.max(le, axis=1)
    if not continuous:
        return best_le
    if log_curve:   # probes sorted by rate: the segment that holds ``at``
        rs, qs = _sorted_by_rate(r, q)
        inside = (rs[:, :-1] <= at[:, None]) & (at[:, None] <= rs[:, 1:]) & (rs[:, 1:] > rs[:, :-1])
        ratio = np.where(inside, rs[:, 1:] / np.where(inside, rs[:, :-1], 1.0), 2.0)
        t = np.where(inside, np.log(np.maximum(at[:, None], 1e-300) / np.where(inside, rs[:, :-1], 1.0))
                     / np.log(ratio), 0.0)
        seg_q = np.where(inside, qs[:, :-1] + t * (qs[:, 1:] - qs[:, :-1]), -np.inf)
        return np.maximum(best_le, np.max(seg_q, axis=1))
    idx_le = np.argmax(le, axis=1)
    gt = np.where(r > at[:, None] * (1 + 1e-12), q, -np.inf)
    has_gt = np.isfinite(np.max(gt, axis=1))
    idx_gt = np.argmax(np.where(r > at[:, None] * (1 + 1e-12), -r, -np.inf), axis=1)   # nearest probe above
    rows = np.arange(n)
    r0, q0, r1, q1 = r[rows, idx_le], q[rows, idx_le], r[rows, idx_gt], q[rows, idx_gt]
    t = np.clip((at - r0) / np.where(r1 > r0, r1 - r0, 1.0), 0, 1)
    return np.where(has_gt & np.isfinite(best_le), np.maximum(best_le, q0 + t * (q1 - q0)), best_le)


def _floor_rate(r: np.ndarray, q: np.ndarray, min_quality, continuous: bool, log_curve: bool = False) -> np.ndarray:
    """Least rate whose (hull) quality reaches the floor; the highest probe rate if none does."""
    n = r.shape[0]
    floor_q = np.broadcast_to(np.asarray(min_quality, float), (n,))
    order = np.argsort(np.where(np.isnan(r), np.inf, r), axis=1)
    rs = np.take_along_axis(r, order, axis=1)
    qs = np.fmax.accumulate(np.take_along_axis(q, order, axis=1), axis=1)   # best quality up to each rate
    reach = qs >= floor_q[:, None]
    first = np.argmax(reach, axis=1)
    rows = np.arange(n)
    out = np.where(reach.any(axis=1), rs[rows, first], np.nanmax(r, axis=1))
    if continuous:
        prev = np.maximum(first - 1, 0)
        r0, q0, r1, q1 = rs[rows, prev], qs[rows, prev], rs[rows, first], qs[rows, first]
        t = np.clip((floor_q - q0) / np.where(q1 > q0, q1 - q0, 1.0), 0, 1)
        inner = r0 * np.power(r1 / r0, t) if log_curve else r0 + t * (r1 - r0)
        out = np.where(reach.any(axis=1) & (first > 0), inner, out)
    return out


def _result(r, q, alloc, slope, feasible, continuous, log_curve=False) -> Allocation:
    return Allocation(rate=alloc, quality=_hull_quality(r, q, alloc, continuous, log_curve), slope=float(slope),
                      total=float(alloc.sum()), feasible=bool(feasible))
