"""Benchmark of the budget planner (``codecs/allocate.py``) on synthetic probe tables.

    python -m ratefit.jobs.tools.bench_planner [--items 1000000] [--probes 8]

Times one solve per codec kind (continuous, discrete) for a budget equal to every item's
median probe, and prints items, seconds and the fraction of the budget used.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ratefit.codecs.allocate import allocate


def synthetic_tables(n: int, k: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Concave R-D curves of varied difficulty: PSNR = a + b·log2(rate/scale + 1), rates in bytes."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(20, 30, n)[:, None]
    b = rng.uniform(2.0, 6.0, n)[:, None]
    scale = rng.uniform(2e3, 4e4, n)[:, None]
    rate = scale * 2.0 ** np.linspace(-2, 2, k)[None, :]
    return rate, a + b * np.log2(rate / scale + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ratefit.jobs.tools.bench_planner", description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--probes", type=int, default=8)
    args = p.parse_args(argv)
    rate, quality = synthetic_tables(args.items, args.probes)
    budget = float(np.median(rate, axis=1).sum())
    for continuous, curve in ((True, "log"), (True, "linear"), (False, "linear")):
        t0 = time.perf_counter()
        out = allocate(rate, quality, budget, continuous=continuous, curve=curve)
        dt = time.perf_counter() - t0
        kind = f"continuous, {curve}" if continuous else "discrete"
        print(f"{kind:<18} {args.items} items x {args.probes} probes: "
              f"{dt:.2f} s, {out.total / budget:.6%} of the budget, slope {out.slope:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
