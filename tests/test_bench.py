"""``ratefit bench`` and the per-stage timings it reads from the manifest.

These check that the numbers exist and add up, never how fast anything is: speed targets
live in docs/benchmarks.md, measured side by side, not in timed tests.
"""

from __future__ import annotations

import json
import shutil

import pyarrow.dataset as ds
import pytest
from PIL import Image

from ratefit.jobs import recompress
from ratefit.jobs.tools import bench
from ratefit.jobs.cli import main
from ratefit.jobs.spec import JobSpec
from ratefit.workers.manifest import STAGE_COLUMNS

pytestmark = pytest.mark.usefixtures("ray_session")


def test_manifest_rows_say_where_the_time_went(tmp_path, photo_dir):
    summary = recompress.run(JobSpec(input=str(photo_dir), output=str(tmp_path / "out"), target_bpp=0.5,
                                     workers=1, progress=False, verify=True))
    assert summary["statuses"] == {"ok": 3}
    for row in ds.dataset(str(tmp_path / "out" / "_manifest")).to_table().to_pylist():
        assert all(row[c] is not None and row[c] >= 0 for c in STAGE_COLUMNS), row
        assert row["analysis_ms"] > 0 and row["entropy_ms"] > 0 and row["read_ms"] > 0
        # The encode stages are parts of encode_ms (which also packs the container).
        assert row["analysis_ms"] + row["search_ms"] + row["entropy_ms"] <= row["encode_ms"] + 1e-6
        assert row["encodes"] >= 1


def test_bench_runs_the_job_and_the_naive_loop_on_the_same_input(tmp_path, samples_dir, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        with Image.open(samples_dir / name) as im:   # without chelsea's 6 kB of XMP and profile: 0.4 bpp
            im.save(photos / name, icc_profile=None)  # of a small photo leaves no room for them
    out = tmp_path / "bench.json"
    assert main(["bench", str(photos), "--target-bpp", "0.4", "--workers", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["items"] == 2
    assert result["pipeline_statuses"] == {"ok": 2} and result["naive_statuses"] == {"ok": 2}
    assert result["pipeline_images_per_s"] > 0 and result["naive_images_per_s"] > 0
    assert result["pipeline_vs_naive"] == pytest.approx(result["naive_wall_s"] / result["pipeline_wall_s"], rel=0.01)
    for side in ("pipeline", "naive"):
        stages = result["stage_ms_per_image"][side]
        assert set(stages) == set(STAGE_COLUMNS)
        assert stages["analysis_ms"] > 0 and stages["entropy_ms"] > 0 and stages["read_ms"] > 0
    assert result["machine"]["cpus"] >= 1 and result["versions"]["torch"] != "not installed"
    table = capsys.readouterr().out
    assert "pipeline / naive:" in table and "naive" in table


def test_driver_bench_reports_cost_per_item_and_peak_memory():
    result = bench.run_driver([300])
    (run,) = result["driver"]
    assert run["items"] == 300 and run["statuses"] == {"ok": 300}
    assert run["driver_ms_per_item"] > 0 and run["driver_peak_rss_mb"] > 50
