"""Equal-slope allocation: budgets met, better than uniform, floors and caps respected."""

from __future__ import annotations

import numpy as np
import pytest

from ratefit.codecs.allocate import allocate
from ratefit.jobs.tools.bench_planner import main as bench_main
from ratefit.jobs.tools.bench_planner import synthetic_tables as synthetic


def test_continuous_allocation_spends_the_budget_and_beats_uniform():
    rate, q = synthetic(500)
    budget = float(np.median(rate, axis=1).sum())
    out = allocate(rate, q, budget)
    assert out.feasible and 0.999 * budget <= out.total <= budget * (1 + 1e-9)
    assert np.all(out.rate >= rate.min(1) - 1e-9) and np.all(out.rate <= rate.max(1) + 1e-9)
    # Uniform: every item at the same fraction of the way along its own curve, same total.
    uniform = allocate(rate, q, budget, max_rate=np.median(rate, axis=1))
    assert out.quality.mean() > uniform.quality.mean() + 0.05
    # At the optimum no item gains by trading bytes with another: marginal slopes are equal
    # wherever the allocation sits strictly inside a hull segment.
    assert out.slope > 0


def test_discrete_allocation_takes_only_probe_rates_and_stays_under_budget():
    rate, q = synthetic(300, seed=1)
    budget = float(rate[:, 3].sum()) * 1.05
    out = allocate(rate, q, budget, continuous=False)
    assert out.total <= budget
    assert out.total >= 0.97 * budget
    assert np.all(np.isclose(out.rate[:, None], rate).any(axis=1))


def test_floors_and_caps():
    rate, q = synthetic(200, seed=2)
    floor_db = 30.0
    out = allocate(rate, q, float(rate[:, 4].sum()), min_quality=floor_db)
    reachable = q.max(1) >= floor_db
    assert np.all(out.quality[reachable] >= floor_db - 1e-6)
    caps = rate[:, 2]
    capped = allocate(rate, q, float(rate.sum()), max_rate=caps)
    assert np.allclose(capped.rate, caps)
    infeasible = allocate(rate, q, float(rate[:, 0].sum()) * 0.5)
    assert not infeasible.feasible


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        allocate(np.ones((3, 4)), np.ones((3, 5)), 10)
    with pytest.raises(ValueError, match="without a usable probe"):
        allocate(np.array([[1.0, 2.0], [np.nan, np.nan]]), np.ones((2, 2)), 10)


def test_planner_benchmark_runs(capsys):
    assert bench_main(["--items", "2000", "--probes", "6"]) == 0
    assert "2000 items x 6 probes" in capsys.readouterr().out


def test_probe_values_spread_over_the_sweep_and_keep_the_range_ends():
    from ratefit.codecs.base import ControlRange
    from ratefit.codecs.probe import probe_values

    wide = ControlRange("level", -5.0, 10.0)
    assert probe_values(wide, 4) == [-5.0, 0.0, 5.0, 10.0]
    values = probe_values(wide, 10, sweep=(-1.0, 8.0))
    assert values == [-5.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0]
    quality = ControlRange("quality", 0, 100, discrete=True)
    assert probe_values(quality, 3, sweep=(10, 20)) == [0.0, 50.0, 100.0]   # discrete codecs ignore it
