"""End-to-end jobs on a real embedded Ray over local folders: outputs, manifest, resume,
bad inputs, listing files, decompress round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ratefit.codecs.metrics import psnr
from ratefit.jobs import cli, decompress, recompress
from ratefit.jobs.runner import JobError
from ratefit.jobs.spec import JobSpec
from ratefit.workers.manifest import COMPRESS_SCHEMA
from ratefit.workers.read import decode_image

pytestmark = pytest.mark.usefixtures("ray_session")


def manifest(out: Path) -> pa.Table:
    return ds.dataset(str(out / "_manifest"), format="parquet").to_table()


def rows_by_name(table: pa.Table) -> dict[str, dict]:
    return {Path(r["input_uri"]).name: r for r in table.to_pylist()}


@pytest.fixture()
def messy_dir(photo_dir: Path) -> Path:
    """The photo tree plus inputs that must become error rows without stopping the job."""
    (photo_dir / "empty.png").write_bytes(b"")
    (photo_dir / "not-an-image.jpg").write_bytes(b"this is plain text, not a JPEG\n" * 10)
    good = (photo_dir / "chelsea.png").read_bytes()
    (photo_dir / "truncated.png").write_bytes(good[: len(good) // 3])
    Image.open(photo_dir / "chelsea.png").convert("L").save(photo_dir / "gray.png")
    Image.new("RGBA", (200, 200), (255, 0, 0, 0)).save(photo_dir / "transparent.png")
    (photo_dir / "notes.txt").write_text("ignored: not an image extension")
    return photo_dir


def test_compress_folder_writes_bitstreams_manifest_and_success(messy_dir, tmp_path):
    out = tmp_path / "out"
    spec = JobSpec(input=str(messy_dir), output=str(out), codec="webp", target_bpp=0.5, shard_size=2)
    summary = recompress.run(spec)

    table = manifest(out)
    assert table.schema.equals(COMPRESS_SCHEMA)
    rows = rows_by_name(table)
    assert set(rows) == {"chelsea.png", "rocket launch.jpg", "café.png", "empty.png", "not-an-image.jpg",
                         "truncated.png", "gray.png", "transparent.png"}
    for name in ("chelsea.png", "rocket launch.jpg", "café.png", "gray.png"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["bpp"] <= 0.5 and r["bpp"] > 0.3
        out_file = Path(r["output_uri"])
        assert out_file.exists() and out_file.stat().st_size == r["output_bytes"]
        assert out_file.name.endswith(".png.webp") or out_file.name.endswith(".jpg.webp")
        assert r["output_bytes"] * 8 / (r["width"] * r["height"]) == pytest.approx(r["bpp"])
        assert 20 < r["psnr"] < 60 and 0.8 < r["ms_ssim"] <= 1.0
        assert r["codec"] == "webp" and r["target_kind"] == "bpp" and r["target_value"] == 0.5
        assert r["encodes"] >= 1 and r["attempt"] == 1
    assert (out / "sub dir" / "ünï" / "café.png.webp").exists()
    assert rows["empty.png"]["status"] == "error" and "empty" in rows["empty.png"]["error"]
    assert rows["not-an-image.jpg"]["status"] == "error" and "not a recognised image" in rows["not-an-image.jpg"]["error"]
    assert rows["truncated.png"]["status"] == "error" and "truncated" in rows["truncated.png"]["error"]
    assert rows["gray.png"]["original_mode"] == "L"
    assert rows["transparent.png"]["status"] in ("ok", "unreachable")
    assert rows["transparent.png"]["original_mode"] == "RGBA"

    success = json.loads((out / "_SUCCESS").read_text())
    assert success == summary
    assert success["items"] == 8 and success["statuses"]["error"] == 3
    assert success["shards"] == 4 and success["resumed_shards"] == 0
    assert success["output_bytes"] == sum(r["output_bytes"] or 0 for r in rows.values())
    assert success["spec"]["codec"] == "webp"


def test_rerun_does_only_what_is_missing_and_overwrite_starts_over(photo_dir, tmp_path):
    out = tmp_path / "out"
    spec = JobSpec(input=str(photo_dir), output=str(out), codec="jpeg", target_bytes=20000, shard_size=1)
    first = recompress.run(spec)
    parts_before = {p.relative_to(out): p.stat().st_mtime_ns for p in (out / "_manifest").rglob("*.parquet")}

    second = recompress.run(spec)   # nothing new: no worker starts, no part is written
    assert second["items"] == 0 and second["unchanged_items"] == first["items"] == 3
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in (out / "_manifest").rglob("*.parquet")} == parts_before
    uris = manifest(out).column("input_uri").to_pylist()
    assert len(uris) == len(set(uris)) == 3

    # As if the first run had been killed after committing two of its three parts: the next
    # run does the missing item, and only that one.
    (out / "_manifest" / f"run={first['run_id']}" / "part-00001.parquet").unlink()
    for p in (out / "_state").iterdir():
        p.unlink()
    (out / "_runs" / f"{first['run_id']}.json").unlink()
    (out / "_runs" / f"{second['run_id']}.json").unlink()
    third = recompress.run(spec)
    assert third["items"] == 1 and third["new_items"] == 1 and third["unchanged_items"] == 2
    assert len(manifest(out)) == 3 and third["state"]["inputs"] == 3

    with pytest.raises(JobError, match="different compress job"):   # another codec option: other bytes
        recompress.run(JobSpec(input=str(photo_dir), output=str(out), codec="jpeg", target_bytes=10000, shard_size=1,
                               codec_options={"subsampling": "4:4:4"}))
    redo = recompress.run(JobSpec(input=str(photo_dir), output=str(out), codec="jpeg", target_bytes=10000,
                                  shard_size=1, overwrite=True))
    assert redo["items"] == 3 and redo["unchanged_items"] == 0
    assert len(manifest(out)) == 3 and max(manifest(out).column("output_bytes").to_pylist()) <= 10000


def test_new_and_changed_inputs_are_the_only_ones_encoded_again(photo_dir, tmp_path):
    out = tmp_path / "out"
    spec = JobSpec(input=str(photo_dir), output=str(out), codec="jpeg", target_bpp=1.0, shard_size=2)
    first = recompress.run(spec)
    shutil.copy(photo_dir / "chelsea.png", photo_dir / "a-new-first-file.png")   # shifts every later shard
    changed = photo_dir / "sub dir" / "rocket launch.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")                         # another size and mtime
    second = recompress.run(spec)
    assert (second["items"], second["new_items"], second["changed_items"], second["unchanged_items"]) == (2, 1, 1, 2)
    rows = manifest(out).to_pylist()
    assert len(rows) == 5   # three from the first run, two from the second
    from ratefit.workers.manifest import current_state
    from ratefit.workers.storage import open_fs

    state = {Path(r["input_uri"]).name: r for r in current_state(*open_fs(str(out))).to_pylist()}
    assert len(state) == 4
    assert state["rocket launch.jpg"]["run_id"] == second["run_id"] != first["run_id"]
    assert state["rocket launch.jpg"]["input_bytes"] == changed.stat().st_size
    assert state["chelsea.png"]["run_id"] == first["run_id"]


def test_decompress_restores_pngs_whose_psnr_matches_the_manifest(photo_dir, tmp_path):
    comp, rest = tmp_path / "comp", tmp_path / "rest"
    recompress.run(JobSpec(input=str(photo_dir), output=str(comp), codec="avif", target_bpp=0.3, shard_size=2))
    summary = decompress.run(JobSpec(input=str(comp), output=str(rest), kind="decompress"))
    assert summary["statuses"] == {"ok": 3}
    restored = {
        "chelsea.png": rest / "chelsea.png",
        "rocket launch.jpg": rest / "sub dir" / "rocket launch.jpg.png",
        "café.png": rest / "sub dir" / "ünï" / "café.png",
    }
    for name, row in rows_by_name(manifest(comp)).items():
        original = decode_image(Path(row["input_uri"]).read_bytes()).pixels
        back = np.asarray(Image.open(restored[name]).convert("RGB"))
        assert back.shape == original.shape
        assert psnr(original, back) == pytest.approx(row["psnr"], abs=1e-9)


def test_decompress_reports_corrupt_and_foreign_containers(photo_dir, tmp_path):
    comp, rest = tmp_path / "comp", tmp_path / "rest"
    recompress.run(JobSpec(input=str(photo_dir), output=str(comp), codec="jpeg", target_bpp=0.5))
    victim = comp / "chelsea.png.jpg"      # a plain JPEG: its manifest row's checksum guards it
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    (comp / "junk.rfic").write_bytes(b"RFIC but not really")
    summary = decompress.run(JobSpec(input=str(comp), output=str(rest), kind="decompress"))
    assert summary["statuses"] == {"ok": 2, "error": 2}
    errors = {Path(r["input_uri"]).name: r["error"] for r in manifest(rest).to_pylist() if r["status"] == "error"}
    assert "checksum" in errors["chelsea.png.jpg"]
    assert "junk.rfic" in errors

    # The pixel limit holds for containers too, from the CLI, before anything is decoded.
    assert cli.main(["decompress", str(comp), str(tmp_path / "small"), "--max-pixels", "100000", "--no-progress"]) == 0
    limited = {Path(r["input_uri"]).name: r for r in manifest(tmp_path / "small").to_pylist()}
    big = limited["café.png.jpg"]     # 600x400 = 240,000 pixels
    assert big["status"] == "error" and "over the limit of 100000" in big["error"]


def test_listing_file_with_per_item_targets(photo_dir, tmp_path):
    listing = photo_dir / "listing.parquet"
    pq.write_table(pa.table({
        "uri": ["chelsea.png", "sub dir/rocket launch.jpg", "sub dir/ünï/café.png", "../escape.png", "missing.png"],
        "target_bpp": [0.25, None, None, None, None],
        "target_bytes": [None, 9000.0, None, None, None],
        "target_psnr": [None, None, 33.0, None, None],
    }), listing)
    out = tmp_path / "out"
    summary = recompress.run(JobSpec(input=str(listing), output=str(out), codec="jpeg", target_bpp=1.0))
    assert summary["items"] == 5
    rows = {r["input_uri"].rsplit("/", 1)[-1]: r for r in manifest(out).to_pylist()}
    assert rows["chelsea.png"]["target_kind"] == "bpp" and rows["chelsea.png"]["bpp"] <= 0.25
    assert rows["rocket launch.jpg"]["target_kind"] == "bytes" and rows["rocket launch.jpg"]["output_bytes"] <= 9000
    cafe = rows["café.png"]
    assert cafe["target_kind"] == "psnr" and cafe["psnr"] >= 33.0
    assert rows["escape.png"]["status"] == "error" and "escape" in rows["escape.png"]["error"]
    assert rows["missing.png"]["status"] == "error" and "not found" in rows["missing.png"]["error"]
    assert rows["missing.png"]["target_value"] == 1.0   # the job-wide default applies
    assert not (tmp_path / "escape.png.jpg").exists()


def test_csv_listing_and_unreachable_target(photo_dir, tmp_path):
    listing = tmp_path / "items.csv"
    pacsv.write_csv(pa.table({"uri": [str(photo_dir / "chelsea.png")], "target_bpp": [0.01]}), listing)
    out = tmp_path / "out"
    summary = recompress.run(JobSpec(input=str(listing), output=str(out), codec="jpeg"))
    row = manifest(out).to_pylist()[0]
    assert summary["statuses"] == {"unreachable": 1}
    assert row["status"] == "unreachable" and "lowest quality" in row["error"]
    assert Path(row["output_uri"]).exists()   # the nearest result is still written
    assert row["rate_param"] == 0.0


def test_a_killed_worker_process_is_replaced_and_its_shard_retried(samples_dir, tmp_path):
    import os
    import signal
    import subprocess
    import threading
    import time

    src = tmp_path / "in"
    src.mkdir()
    for i in range(10):
        shutil.copy(samples_dir / "coffee.png", src / f"img{i:02d}.png")
    out = tmp_path / "out"
    result: dict = {}
    spec = JobSpec(input=str(src), output=str(out), codec="avif", target_bpp=0.6, shard_size=1, workers=2,
                   ms_ssim=False)
    job = threading.Thread(target=lambda: result.setdefault("summary", recompress.run(spec)))
    job.start()
    killed = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed is None and job.is_alive():
        if (out / "_manifest").exists() and list((out / "_manifest").rglob("part-*.parquet")):
            pids = subprocess.run(["pgrep", "-f", "ray::ShardWorker"], capture_output=True, text=True).stdout.split()
            if pids:
                killed = int(pids[0])
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    job.join(300)
    assert killed is not None, "no worker process was found to kill"
    summary = result["summary"]
    assert summary["items"] == 10 and summary["statuses"] == {"ok": 10}
    assert summary["retried_shards"] >= 1
    rows = manifest(out).to_pylist()
    assert sorted(Path(r["input_uri"]).name for r in rows) == [f"img{i:02d}.png" for i in range(10)]
    assert any(r["attempt"] == 2 for r in rows)
    for r in rows:
        assert Path(r["output_uri"]).stat().st_size == r["output_bytes"]


def test_verify_flag_reads_every_file_back_and_counts_it(messy_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["compress", str(messy_dir), str(out), "--codec", "jpeg", "--target-bpp", "0.8", "--verify",
                            "--shard-size", "3", "--no-progress"]) == 0
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["spec"]["verify"] is True
    written = summary["statuses"]["ok"] + summary["statuses"].get("unreachable", 0)
    assert written == 5 and summary["verified_items"] == 5 and summary["verify_failures"] == 0
    assert "5 verified, 0 verify failure(s)" in capsys.readouterr().out
    rows = manifest(out).to_pylist()
    assert all(r["verified"] is True for r in rows if r["status"] != "error")
    assert all(r["verified"] is None for r in rows if r["status"] == "error")
    # Verification does not change what a job is: the same OUTPUT resumes without it.
    again = recompress.run(JobSpec(input=str(messy_dir), output=str(out), codec="jpeg", target_bpp=0.8,
                                   shard_size=3))
    errors = sum(1 for r in rows if r["status"] == "error")
    assert again["unchanged_items"] == written and again["retried_items"] == errors   # errors are tried again
    assert "verify_failures" not in again


def test_finish_reads_back_only_parts_it_did_not_see_written(photo_dir, tmp_path, monkeypatch):
    """The summary comes from the workers' per-part stats; a resumed job (shard-resumed, as
    decompress and budget jobs are) reads back exactly the parts committed before it, and both
    ways give the same summary. Compress runs never read parts back: each run's are new."""
    from ratefit.jobs import runner

    reads: list[str] = []
    real_fetch = runner.fetch
    monkeypatch.setattr(runner, "fetch", lambda fs, path: reads.append(path) or real_fetch(fs, path))
    comp, out = tmp_path / "comp", tmp_path / "out"
    compressed = recompress.run(JobSpec(input=str(photo_dir), output=str(comp), codec="webp", target_bpp=0.6))
    assert compressed["statuses"] == {"ok": 3} and not [p for p in reads if "part-" in p]
    spec = JobSpec(input=str(comp), output=str(out), kind="decompress", shard_size=1)
    first = decompress.run(spec)
    assert first["statuses"] == {"ok": 3} and not [p for p in reads if "part-" in p]
    (out / "_manifest" / "part-00001.parquet").unlink()
    reads.clear()
    second = decompress.run(spec)
    assert sorted(p.rsplit("/", 1)[-1] for p in reads if "_manifest/part-" in p) == \
        ["part-00000.parquet", "part-00002.parquet"]
    assert second["statuses"] == first["statuses"] and second["resumed_shards"] == 2
    keys = ("items", "input_bytes", "output_bytes")
    assert {k: second[k] for k in keys} == {k: first[k] for k in keys}
