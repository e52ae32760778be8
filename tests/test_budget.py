"""Budget jobs: one byte budget for a collection, probe → plan → encode → correct, on real Ray.

The Kodak figure (budget vs the same mean rate for every image) is in test_kodak_e2e.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from ratefit.jobs import budget, recompress, report
from ratefit.jobs.runner import JobError
from ratefit.jobs.spec import JobSpec, SpecError


def _rows(out: Path) -> list[dict]:
    return ds.dataset(str(out / "_manifest"), format="parquet").to_table().to_pylist()


def _on_disk(out: Path, rows: list[dict]) -> int:
    return sum(Path(r["output_uri"]).stat().st_size for r in rows if r["status"] in ("ok", "unreachable"))


# ----------------------------------------------------------------------------- pure parts

def _probes(rate, psnr, pixels, cap=None, floor=None) -> budget.Probes:
    rate, psnr = np.asarray(rate, float), np.asarray(psnr, float)
    n = rate.shape[0]
    return budget.Probes(uri=[f"i{i}" for i in range(n)], ok=np.ones(n, bool), error=[None] * n,
                         pixels=np.asarray(pixels, float), rate=rate, psnr=psnr,
                         cap=np.full(n, np.inf) if cap is None else np.asarray(cap, float),
                         floor_db=np.full(n, np.nan) if floor is None else np.asarray(floor, float))


def test_plan_gives_bytes_where_quality_per_byte_is_highest():
    # Image 0 gains 6 dB for its extra 1000 bytes, image 1 only 1 dB: with room for one
    # upgrade, the plan upgrades image 0, and predicts more than the uniform split.
    p = _probes([[1000, 2000], [1000, 2000]], [[30, 36], [30, 31]], [10_000, 10_000])
    spec = JobSpec(input="in", output="out", budget_bytes=3000)
    table, summary = budget.make_plan(spec, p, continuous=False)
    assert table["alloc_bytes"].to_pylist() == [2000, 1000]
    assert summary["predicted_mean_psnr"] == pytest.approx(33.0)
    assert summary["uniform_predicted_mean_psnr"] == pytest.approx(30.0)   # 1500 each: no whole step
    cont, _ = budget.make_plan(spec, p, continuous=True)
    assert cont["alloc_bytes"].to_pylist() == pytest.approx([2000, 1000])


def test_plan_respects_caps_floors_and_refuses_an_infeasible_floor():
    p = _probes([[1000, 2000, 4000]] * 2, [[30, 36, 40], [30, 36, 40]], [10_000, 10_000], cap=[np.inf, 1500])
    table, _ = budget.make_plan(JobSpec(input="in", output="out", budget_bytes=8000), p, continuous=True)
    assert table["alloc_bytes"].to_pylist()[1] <= 1500
    floored = _probes([[1000, 2000, 4000]] * 2, [[30, 36, 40], [30, 31, 32]], [10_000, 10_000])
    spec = JobSpec(input="in", output="out", budget_bytes=5000, min_psnr=31.5)
    alloc = budget.make_plan(spec, floored, continuous=True)[0]["alloc_bytes"].to_pylist()
    # Image 1 reaches 31.5 dB half way from 2000 to 4000 bytes in log-rate: 2000·√2 bytes.
    assert alloc[1] >= 2000 * 2 ** 0.5 - 1e-6
    with pytest.raises(JobError, match="cannot hold"):
        budget.make_plan(JobSpec(input="in", output="out", budget_bytes=5000, min_psnr=39), floored, continuous=True)


def test_mse_objective_favours_the_image_with_the_larger_error():
    # Same PSNR curves, but image 1 has ten times the pixels: its squared error weighs more.
    p = _probes([[1000, 2000], [1000, 2000]], [[30, 33], [30, 33]], [10_000, 100_000])
    table, _ = budget.make_plan(JobSpec(input="in", output="out", budget_bytes=3000, objective="mse"), p,
                                continuous=False)
    assert table["alloc_bytes"].to_pylist() == [1000, 2000]


def test_corrections_only_outside_the_landing_range_and_within_the_budget():
    rows = {"status": ["ok", "ok", "ok", "error"], "output_bytes": [5000, 3000, 2000, None]}
    cap = np.full(4, np.inf)
    assert budget.choose_corrections(rows, 10_050, cap) == {}                 # 99.5%: nothing to do
    spend = budget.choose_corrections(rows, 11_000, cap)                       # 90.9%: spend
    assert spend and all(t > rows["output_bytes"][i] for i, t in spend.items())
    moved = sum(t - rows["output_bytes"][i] for i, t in spend.items())
    assert 10_000 + moved == pytest.approx(budget.CORRECTION_AIM * 11_000)
    recover = budget.choose_corrections(rows, 9_500, cap)                      # over: recover
    assert all(t < rows["output_bytes"][i] for i, t in recover.items())
    assert 3 not in spend and 3 not in recover                                 # errors are never re-encoded


def test_spec_rejects_mixed_targets_and_stray_budget_options():
    with pytest.raises(SpecError, match="one of a job-wide target or a budget"):
        JobSpec(input="in", output="out", target_bpp=0.5, budget_bpp=0.5)
    with pytest.raises(SpecError, match="min_psnr is a floor for budget jobs"):
        JobSpec(input="in", output="out", target_bpp=0.5, min_psnr=30)
    with pytest.raises(SpecError, match="objective"):
        JobSpec(input="in", output="out", budget_bpp=0.5, objective="ssim")
    with pytest.raises(SpecError, match="budget_bytes"):
        JobSpec(input="in", output="out", budget_bytes=-1)
    plain = JobSpec(input="in", output="out", target_bpp=0.5)
    assert plain.spec_hash() == JobSpec(input="in", output="out", target_bpp=0.5, objective="psnr").spec_hash()
    assert JobSpec(input="in", output="out", budget_bpp=0.5).spec_hash() != \
        JobSpec(input="in", output="out", budget_bpp=0.5, min_psnr=30).spec_hash()


# ---------------------------------------------------------------------------- whole jobs

def test_learned_budget_job_lands_in_the_budget_and_resumes(ray_session, photo_dir, tmp_path):
    out = tmp_path / "out"
    spec = JobSpec(input=str(photo_dir), output=str(out), budget_bpp=0.5, shard_size=2, ms_ssim=False)
    summary = recompress.run(spec)
    rows = _rows(out)
    assert summary["statuses"] == {"ok": 3} and len(rows) == 3
    b = summary["budget"]
    pixels = sum(r["width"] * r["height"] for r in rows)
    assert b["budget_bytes"] == pytest.approx(0.5 * pixels / 8)
    assert 0.99 <= b["achieved_fraction"] <= 1.0, b
    assert b["achieved_bytes"] == _on_disk(out, rows)
    assert b["predicted_mean_psnr"] >= b["uniform_predicted_mean_psnr"]
    for r in rows:   # each image at its own allocated ceiling
        assert r["target_kind"] == "bytes" and r["output_bytes"] <= r["target_value"]
    assert len({r["target_value"] for r in rows}) == 3
    plan = json.loads((out / "_plan" / "plan.json").read_text())
    assert plan["items_planned"] == 3 and plan["continuous"] is True
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["budget"]["achieved_bytes"] == b["achieved_bytes"]

    page = report.build_report(str(out))   # the HTML report: summary, three plots, no errors section
    assert page.count("data:image/png;base64,") == 3 and "achieved_fraction" in page and "Errors" not in page
    with pytest.raises(JobError, match="has no _SUCCESS"):
        report.build_report(str(tmp_path / "nothing"))

    mtimes = {r["output_uri"]: Path(r["output_uri"]).stat().st_mtime_ns for r in rows}
    again = recompress.run(spec)   # every pass is committed: nothing is probed or encoded again
    assert again["resumed_shards"] == again["shards"] == 2
    assert again["budget"]["achieved_bytes"] == b["achieved_bytes"]
    assert {u: Path(u).stat().st_mtime_ns for u in mtimes} == mtimes


def test_budget_job_keeps_bad_inputs_as_rows_and_honours_the_floor(ray_session, photo_dir, tmp_path):
    (photo_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    out = tmp_path / "out"
    summary = recompress.run(JobSpec(input=str(photo_dir), output=str(out), budget_bpp=1.0, min_psnr=30.0,
                                     shard_size=2, ms_ssim=False))
    rows = {Path(r["input_uri"]).name: r for r in _rows(out)}
    assert len(rows) == 4 and rows["broken.png"]["status"] == "error"
    assert "probe pass failed" in rows["broken.png"]["error"]
    probe_rows = ds.dataset(str(out / "_plan" / "probes"), format="parquet").to_table().to_pylist()
    assert any("decode" in (r["error"] or "") for r in probe_rows)   # the cause, kept in the probe pass
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 3 and min(r["psnr"] for r in ok) >= 30.0 - 0.1
    assert 0.99 <= summary["budget"]["achieved_fraction"] <= 1.0
    one = tmp_path / "one"   # a floor no budget can hold needs only one photo to show (probing is the cost)
    one.mkdir()
    shutil.copy(photo_dir / "chelsea.png", one / "chelsea.png")
    with pytest.raises(JobError, match="cannot hold"):
        recompress.run(JobSpec(input=str(one), output=str(tmp_path / "o2"), budget_bpp=0.2,
                               min_psnr=45.0, ms_ssim=False))


def test_discrete_codec_budget_correction_pass_replaces_rows(ray_session, samples_dir, tmp_path):
    """JPEG's steps between probed qualities are coarse for four images, so the encode pass
    lands well under the budget and the correction pass re-encodes images with larger
    targets; the merged manifest must describe the files now on disk."""
    src = tmp_path / "in"
    shutil.copytree(samples_dir, src)
    out = tmp_path / "out"
    summary = recompress.run(JobSpec(input=str(src), output=str(out), codec="jpeg", budget_bpp=0.8,
                                     shard_size=3, ms_ssim=False))
    b = summary["budget"]
    rows = _rows(out)
    assert b["correction_tried"] > 0 and b["corrected_items"] > 0
    assert b["encoded_bytes_before_correction"] < b["achieved_bytes"] <= b["budget_bytes"]
    assert b["achieved_bytes"] == _on_disk(out, rows)
    for r in rows:
        assert Path(r["output_uri"]).stat().st_size == r["output_bytes"]
        assert r["output_bytes"] <= r["target_value"]
    assert sorted(r["shard"] for r in rows) == [0, 0, 0, 1]
