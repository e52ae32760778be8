"""Per-item rate control: find the rate-control value that meets a target.

This module is the one place that decides what "meets the target" means:

* a rate target (``bpp`` or ``bytes``) is a ceiling on the *stored* size, container header
  included: the result never exceeds it and is as close below it as the codec allows;
* a ``psnr`` target asks for the smallest output whose PSNR reaches it;
* a target the codec cannot reach gives ``unreachable`` with the nearest result kept.

Discrete codecs (integer quality) are searched over their integer positions with
interpolation in log-size, falling back to bisection when interpolation stalls. Continuous
codecs are searched on the codec's cheap rate ``estimate`` (secant steps in log-rate inside
a bisection bracket), then encoded for real, and corrected while the real size is above the
ceiling. The search assumes rate and quality grow monotonically with the control value.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ratefit.codecs.base import Codec
from ratefit.codecs.metrics import psnr as psnr_of

TARGET_KINDS = ("bpp", "bytes", "psnr")
RATE_TOLERANCE = 0.005      # continuous codecs: land within 0.5% below a rate ceiling
PSNR_TOLERANCE_DB = 0.02    # continuous codecs: land within 0.02 dB above a PSNR target
MAX_CORRECTIONS = 4
# The estimate is solved into the upper part of the window only: the real size sits a few bytes
# below an estimate (the coder's flush is priced at its worst case), and an estimate at the
# window's lower edge put the real size just under it, costing two more encodes.
ESTIMATE_TOLERANCE = 0.6 * RATE_TOLERANCE


@dataclass(frozen=True)
class Target:
    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target kind must be one of {TARGET_KINDS}, got {self.kind!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, numbers.Real) \
                or not math.isfinite(self.value) or self.value <= 0:
            raise ValueError(f"target {self.kind} must be a positive finite number, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))

    def max_bytes(self, pixels: int) -> int | None:
        """The stored-size ceiling for an image of ``pixels`` pixels, or None for a quality target."""
        if self.kind == "bytes":
            return int(math.floor(self.value))
        if self.kind == "bpp":
            return int(math.floor(self.value * pixels / 8.0))
        return None


@dataclass
class Outcome:
    value: float
    payload: bytes
    status: str               # "ok" | "unreachable"
    reason: str | None
    encodes: int              # real encodes made by the search (entropy coding included)
    estimates: int = 0        # cheap rate estimates made by the search


class _Probe:
    """Caches real encodes (and their PSNR) by control value, counting them."""

    def __init__(self, codec: Codec, prepared: Any, image: np.ndarray):
        self.codec, self.prepared, self.image = codec, prepared, image
        self.payloads: dict[float, bytes] = {}
        self.psnrs: dict[float, float] = {}
        self.bits: dict[float, float | None] = {}
        self.exact: dict[float, float] = {}
        self.encodes = 0
        self.estimates = 0

    def payload(self, value: float) -> bytes:
        if value not in self.payloads:
            self.payloads[value] = self.codec.encode(self.prepared, value)
            self.encodes += 1
        return self.payloads[value]

    def size(self, value: float) -> int:
        return len(self.payload(value))

    def psnr(self, value: float) -> float:
        if value not in self.psnrs:
            h, w = self.image.shape[:2]
            rec = self.codec.decode(self.payload(value), w, h, value)
            self.psnrs[value] = psnr_of(self.image, rec)
        return self.psnrs[value]

    def estimate_bits(self, value: float) -> float | None:
        if value not in self.bits:   # a correction's re-solve comes back to values already priced
            self.bits[value] = self.codec.estimate(self.prepared, value)
            if self.bits[value] is not None:
                self.estimates += 1
        return self.bits[value]

    def exact_bits(self, value: float) -> float:
        """The codec's ``estimate_exact`` (its coder's own price, dearer than ``estimate``)."""
        if value not in self.exact:
            self.exact[value] = self.codec.estimate_exact(self.prepared, value)
            self.estimates += 1
        return self.exact[value]


def search(codec: Codec, prepared: Any, image: np.ndarray, target: Target, overhead: int,
           start: float | None = None) -> Outcome:
    """Search the control value for ``target``; ``overhead`` is what the stored file adds to the
    payload (the container header and the sections carrying metadata and alpha).

    ``start`` is a control value to begin from (a warm start: the previous image's result,
    where similar images land close together); it changes how many estimates the search
    takes, never the rule the result obeys. Continuous rate targets only.
    """
    probe = _Probe(codec, prepared, image)
    h, w = image.shape[:2]
    ceiling = target.max_bytes(w * h)
    if ceiling is not None and ceiling <= overhead:
        v = _value_of(codec, 0.0)
        return Outcome(v, probe.payload(v), "unreachable",
                       f"the {target.kind} ceiling ({ceiling:,} B) leaves no room for a payload after "
                       f"{overhead:,} B of container header, metadata and alpha", probe.encodes)
    if codec.control.discrete:
        out = _discrete(codec, probe, target, None if ceiling is None else ceiling - overhead)
    elif ceiling is not None:
        out = _continuous_rate(codec, probe, ceiling - overhead, None if start is None else _u_of(codec, start))
    else:
        out = _continuous_psnr(codec, probe, target.value)
    out.encodes, out.estimates = probe.encodes, probe.estimates
    return out


def aim(codec: Codec, prepared: Any, image: np.ndarray, target: Target, overhead: int) -> float:
    """The control value the search would settle on, found as cheaply as the codec allows.

    For a rate target on a codec with an estimate, the value whose *estimated* size meets the
    ceiling (no real encode); otherwise the full search's value. Latent refinement aims its
    optimisation here, and the real search then runs again on the refined latents.
    """
    h, w = image.shape[:2]
    ceiling = target.max_bytes(w * h)
    estimate = functools.cache(lambda u: codec.estimate(prepared, _value_of(codec, u)))
    if ceiling is not None and not codec.control.discrete and estimate(0.0) is not None:
        u, _ = _solve_below(lambda x: estimate(x) / 8.0, max(ceiling - overhead, 1), RATE_TOLERANCE)
        return _value_of(codec, u)
    return search(codec, prepared, image, target, overhead).value


# ----------------------------------------------------------------------------- discrete

def _first_true(evaluate: Callable[[int], tuple[bool, float]], n: int, threshold: float) -> int:
    """First position in [0, n) whose predicate is true (n if none), for a monotone predicate.

    ``evaluate(pos)`` returns (predicate, measure); the measure (log size or PSNR, growing
    with pos) steers interpolation between the bracket ends towards ``threshold``.
    """
    lo, hi = -1, n            # virtual ends: predicate false below 0, true at n
    m_lo = m_hi = None
    probe = (n - 1) // 2
    while hi - lo > 1:
        width = hi - lo
        flag, measure = evaluate(probe)
        if flag:
            hi, m_hi = probe, measure
        else:
            lo, m_lo = probe, measure
        probe = (lo + hi) // 2
        if m_lo is not None and m_hi is not None and m_hi > m_lo and hi - lo > 2 and (hi - lo) * 2 <= width:
            guess = lo + (threshold - m_lo) / (m_hi - m_lo) * (hi - lo)
            probe = int(min(max(round(guess), lo + 1), hi - 1))
    return hi


def _discrete(codec: Codec, probe: _Probe, target: Target, budget: int | None) -> Outcome:
    ctrl = codec.control
    low, high = int(ctrl.low), int(ctrl.high)
    n = high - low + 1

    def value_at(pos: int) -> float:
        return float(low + pos if ctrl.increasing else high - pos)

    if budget is not None:
        if budget <= 0:
            return Outcome(value_at(0), probe.payload(value_at(0)), "unreachable",
                           f"target leaves no room for a payload after the {target.kind} ceiling", 0)

        def over(pos: int) -> tuple[bool, float]:
            size = probe.size(value_at(pos))
            return size > budget, math.log(max(size, 1))

        first_over = _first_true(over, n, math.log(budget))
        if first_over == 0:
            v = value_at(0)
            return Outcome(v, probe.payload(v), "unreachable",
                           f"even the lowest {ctrl.name} ({v:g}) gives {probe.size(v)} payload bytes, "
                           f"above the {budget} the target allows", 0)
        v = value_at(first_over - 1)
        if first_over == n:
            return Outcome(v, probe.payload(v), "unreachable",
                           f"the highest {ctrl.name} ({v:g}) gives only {probe.size(v)} payload bytes, "
                           f"below the {budget} the target allows", 0)
        return Outcome(v, probe.payload(v), "ok", None, 0)

    def reaches(pos: int) -> tuple[bool, float]:
        p = probe.psnr(value_at(pos))
        return p >= target.value, p

    first = _first_true(reaches, n, target.value)
    if first == n:
        v = value_at(n - 1)
        return Outcome(v, probe.payload(v), "unreachable",
                       f"the highest {ctrl.name} ({v:g}) reaches {probe.psnr(v):.2f} dB, "
                       f"below the {target.value:g} dB target", 0)
    v = value_at(first)
    return Outcome(v, probe.payload(v), "ok", None, 0)


# --------------------------------------------------------------------------- continuous

def _value_of(codec: Codec, u: float) -> float:
    """Map u in [0, 1] (0 = lowest rate) to the codec's control value."""
    c = codec.control
    return c.low + u * (c.high - c.low) if c.increasing else c.high - u * (c.high - c.low)


def _u_of(codec: Codec, value: float) -> float:
    """The inverse of ``_value_of``, clamped to [0, 1]."""
    c = codec.control
    u = (value - c.low) / (c.high - c.low)
    return min(max(u if c.increasing else 1.0 - u, 0.0), 1.0)


# d log(rate) / du the first warm step assumes: the default codec spans ~0.05-2 bpp over its
# range (log 40 = 3.7); the second step uses the slope the first two points measured.
WARM_SLOPE = 3.7
WARM_OVERSHOOT = 1.15   # steps past the aim by this much in log-rate, to bracket it on the first try


def _bracket_from(rate: Callable[[float], float], limit: float, tol: float, guess: float,
                  iters: int = 12) -> tuple[float, ...] | None:
    """A bracket (lo, hi, rate(lo), rate(hi)) around ``limit`` found by stepping from ``guess``.

    Newton-like steps in log-rate (first with ``WARM_SLOPE``, then with the measured slope),
    each a little past the aim, so a good guess brackets in two estimates instead of the
    cold start's range ends. Returns (u, rate(u)) instead when that is the answer: a point
    within ``tol`` below the limit, or a range end first (0, r) with r above the limit, or
    (1, r) with r within it; None if it gives up (the caller then brackets at the range's ends).
    """
    log_limit = math.log(limit * (1.0 - tol / 2))   # the window's middle, as in _solve_below
    u, r = guess, rate(guess)
    slope = WARM_SLOPE
    for _ in range(iters):
        if limit * (1.0 - tol) <= r <= limit or (r <= limit and u >= 1.0) or (r > limit and u <= 0.0):
            return u, r
        step = (log_limit - math.log(max(r, 1e-9))) / slope
        step = step * WARM_OVERSHOOT if abs(step) > 1e-3 else math.copysign(1e-3, step or 1.0)
        u2 = min(max(u + step, 0.0), 1.0)
        r2 = rate(u2)
        if (r <= limit) != (r2 <= limit):   # bracketed
            return (u, u2, r, r2) if u < u2 else (u2, u, r2, r)
        if r2 > 0 and r > 0 and u2 != u and r2 != r:
            slope = max((math.log(r2) - math.log(r)) / (u2 - u), 0.1)
        u, r = u2, r2
    return None


def _solve_below(rate: Callable[[float], float], limit: float, tol: float, iters: int = 40,
                 guess: float | None = None) -> tuple[float, float]:
    """Largest u in [0, 1] with rate(u) <= limit, within ``tol`` of the limit; rate grows with u.

    Returns (u, rate(u)); u = 0 when even rate(0) is above the limit. Secant steps in
    log-rate, kept inside the bisection bracket and abandoned when the bracket stops halving.
    A ``guess`` (warm start) brackets the limit near it first instead of at the range's ends.
    """
    found = _bracket_from(rate, limit, tol, guess) if guess is not None else None
    if found is not None and len(found) == 2:
        return found[0], found[1]
    if found is not None:
        lo, hi, r_lo, r_hi = found
    else:
        r0 = rate(0.0)
        if r0 > limit:
            return 0.0, r0
        r1 = rate(1.0)
        if r1 <= limit:
            return 1.0, r1
        lo, hi, r_lo, r_hi = 0.0, 1.0, r0, r1
    # Aim at the middle of the window [limit*(1-tol), limit], not at its top edge: secant steps
    # on a convex log-rate curve approach from one side, and aimed at the edge they creep up
    # to it from above, each overshoot costing an estimate and a bisection step.
    log_limit = math.log(limit * (1.0 - tol / 2))
    # Secant through the two latest points (the local slope: the curve bends over the range,
    # so a far bracket end steers badly), kept inside the bracket; a bisection step when two
    # steps in a row did not halve it.
    prev, last = (lo, r_lo), (hi, r_hi)
    slow = 0
    for _ in range(iters):
        if r_lo >= limit * (1.0 - tol) or hi - lo < 1e-7:
            break
        width = hi - lo
        (u0, q0), (u1, q1) = prev, last
        # Two rates a few ulps apart have equal logs (a flat stretch of the curve): bisect.
        dlog = math.log(q1) - math.log(q0) if q0 > 0 and q1 > 0 else 0.0
        if slow >= 2 or dlog == 0.0 or u0 == u1:
            u, slow = 0.5 * (lo + hi), 0
        else:
            u = u1 + (log_limit - math.log(q1)) * (u1 - u0) / dlog
            u = min(max(u, lo + 0.02 * width), hi - 0.02 * width)
        r = rate(u)
        if r <= limit:
            lo, r_lo = u, r
        else:
            hi, r_hi = u, r
        prev, last = last, (u, r)
        slow = slow + 1 if hi - lo > 0.5 * width else 0
    return lo, r_lo


def _continuous_rate(codec: Codec, probe: _Probe, budget: int, start: float | None = None) -> Outcome:
    if budget <= 0:
        v = _value_of(codec, 0.0)
        return Outcome(v, probe.payload(v), "unreachable", "target leaves no room for a payload", 0)
    has_estimate = probe.estimate_bits(_value_of(codec, 0.0 if start is None else start)) is not None
    exact = callable(getattr(codec, "estimate_exact", None))

    def real_bytes(u: float) -> float:
        return float(probe.size(_value_of(codec, u)))

    if not has_estimate:
        u, _ = _solve_below(real_bytes, budget, RATE_TOLERANCE)
    else:
        # Solve on the estimate, encode for real, and re-aim the estimate by the ratio it
        # missed by (either way) until the real size lands in [budget*(1-tol), budget].
        aim, best = float(budget), None
        for _ in range(MAX_CORRECTIONS):
            u, _ = _solve_below(lambda x: probe.estimate_bits(_value_of(codec, x)) / 8.0, aim, ESTIMATE_TOLERANCE,
                                guess=start)
            if exact:   # a cheap estimate lands near; the coder's own price settles it before encoding
                u, _ = _solve_below(lambda x: probe.exact_bits(_value_of(codec, x)) / 8.0, aim, ESTIMATE_TOLERANCE,
                                    guess=u)
            start = u   # a correction re-solves from where the last try landed
            real = real_bytes(u)
            if real <= budget and (best is None or real > real_bytes(best)):
                best = u
            if budget * (1.0 - RATE_TOLERANCE) <= real <= budget:
                break
            if (u == 0.0 and real > budget) or (u == 1.0 and real <= budget):
                break   # the codec's range ends here
            aim *= budget / max(real, 1.0) * (1.0 - RATE_TOLERANCE / 2)
        if best is None and u > 0.0:
            # The estimate kept running low: finish with real encodes below the last try.
            top = u
            x, _ = _solve_below(lambda x: real_bytes(x * top), budget, RATE_TOLERANCE)
            best = x * top
        u = best if best is not None else 0.0
    v = _value_of(codec, u)
    size = probe.size(v)
    if size > budget:
        return Outcome(v, probe.payload(v), "unreachable",
                       f"even the lowest rate gives {size} payload bytes, above the {budget} the target allows", 0)
    if u == 1.0:
        return Outcome(v, probe.payload(v), "unreachable",
                       f"the highest rate gives only {size} payload bytes, below the {budget} the target allows", 0)
    return Outcome(v, probe.payload(v), "ok", None, 0)


def _continuous_psnr(codec: Codec, probe: _Probe, target_db: float) -> Outcome:
    v_hi = _value_of(codec, 1.0)
    if probe.psnr(v_hi) < target_db:
        return Outcome(v_hi, probe.payload(v_hi), "unreachable",
                       f"the highest rate reaches {probe.psnr(v_hi):.2f} dB, below the {target_db:g} dB target", 0)
    lo, hi = 0.0, 1.0
    if probe.psnr(_value_of(codec, 0.0)) >= target_db:
        hi = 0.0
    while hi - lo > 1e-4 and probe.psnr(_value_of(codec, hi)) - target_db > PSNR_TOLERANCE_DB:
        mid = 0.5 * (lo + hi)
        if probe.psnr(_value_of(codec, mid)) >= target_db:
            hi = mid
        else:
            lo = mid
    v = _value_of(codec, hi)
    return Outcome(v, probe.payload(v), "ok", None, 0)
