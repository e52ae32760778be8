"""Scheduled recompression of a growing archive: incremental runs, run history, the current
state, and retiring originals safely (a run killed at any point loses no image)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ratefit.codecs import container
from ratefit.codecs.registry import get_codec
from ratefit.jobs import recompress
from ratefit.jobs.cli import main as cli
from ratefit.jobs.spec import JobSpec, SpecError
from ratefit.workers.manifest import current_state, parquet_table
from ratefit.workers.storage import open_fs

pytestmark = pytest.mark.usefixtures("ray_session")
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png")


def _decodes_to(blob: bytes, psnr_expected: float, original: np.ndarray) -> bool:
    from ratefit.codecs.metrics import psnr

    if blob.startswith(container.MAGIC):
        header, payload = container.unpack(blob)
        pixels = get_codec(header.codec).decode(payload, header.width, header.height, header.value)
    else:   # a plain file (jpeg, webp, avif): any image reader opens it
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    return psnr(original, pixels) == pytest.approx(psnr_expected, abs=1e-9)


def test_three_runs_over_a_growing_s3_prefix_process_exactly_the_new_and_changed(
        s3_server, s3fs_client, samples_dir, tmp_path, capsys):
    fs, opts = s3fs_client, s3_server.storage_options
    bucket = f"rf-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)

    def put(name: str, data: bytes | None = None) -> None:
        fs.pipe_file(f"{bucket}/archive/{name}", data if data is not None else (samples_dir / name).read_bytes())

    spec = JobSpec(input=f"s3://{bucket}/archive", output=f"s3://{bucket}/out", codec="jpeg", target_bpp=0.6,
                   shard_size=2, storage_options=opts, ms_ssim=False)
    put("chelsea.png")
    put("coffee.png")
    first = recompress.run(spec)
    assert (first["items"], first["new_items"], first["unchanged_items"]) == (2, 2, 0)

    put("rocket.jpg")
    fs.pipe_file(f"{bucket}/archive/2026/11/astronaut.png", (samples_dir / "astronaut.png").read_bytes())
    second = recompress.run(spec)
    assert (second["items"], second["new_items"], second["changed_items"], second["unchanged_items"]) == (2, 2, 0, 2)

    put("zz-new.png", (samples_dir / "chelsea.png").read_bytes())
    from PIL import Image
    buf = io.BytesIO()
    Image.open(samples_dir / "coffee.png").rotate(180).save(buf, format="PNG")
    put("coffee.png", buf.getvalue())   # the same key, new content (a new ETag)
    third = recompress.run(spec)
    assert (third["items"], third["new_items"], third["changed_items"], third["unchanged_items"]) == (2, 1, 1, 3)
    assert third["statuses"] == {"ok": 2} and third["state"] == {
        "inputs": 5, "statuses": {"ok": 5}, "retired": 0,
        "input_bytes": third["state"]["input_bytes"], "output_bytes": third["state"]["output_bytes"]}

    # Parts of the three runs never collide: one folder per run.
    runs = sorted(p.rsplit("=", 1)[-1] for p in fs.ls(f"{bucket}/out/_manifest"))
    assert runs == [first["run_id"], second["run_id"], third["run_id"]]

    # The current state: one row per input, the changed one from the third run.
    state = current_state(*open_fs(spec.output, opts)).to_pylist()
    by_name = {r["input_uri"].rsplit("/", 1)[-1]: r for r in state}
    assert len(state) == 5 and len({r["input_uri"] for r in state}) == 5
    assert by_name["coffee.png"]["run_id"] == third["run_id"] and by_name["chelsea.png"]["run_id"] == first["run_id"]
    assert by_name["coffee.png"]["source_version"].startswith("etag:")
    rotated = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert _decodes_to(fs.cat_file(by_name["coffee.png"]["output_uri"]), by_name["coffee.png"]["psnr"], rotated)

    # The commands: run history and the exported state.
    capsys.readouterr()
    assert cli(["runs", spec.output, "--storage-options", json.dumps(opts)]) == 0
    out = capsys.readouterr().out
    assert out.count("finished") == 3 and "state after" in out and "5 inputs (5 ok)" in out
    assert cli(["manifest", spec.output, "--storage-options", json.dumps(opts), "--out", str(tmp_path / "s.parquet")]) == 0
    exported = pq.read_table(tmp_path / "s.parquet")
    assert len(exported) == 5 and "retired" in exported.column_names
    records = [json.loads(fs.cat_file(f"{bucket}/out/_runs/{r}.json")) for r in runs]
    assert [r["items"] for r in records] == [2, 2, 2] and all(r["spec_hash"] == spec.spec_hash() for r in records)
    assert records[0]["saved_bytes"] > 0 and records[0]["wall_s"] > 0


def test_retiring_needs_a_committed_verified_row_and_an_unchanged_original(photo_dir, tmp_path):
    """Originals go only after verify + commit; a backlog of verified rows is retired later;
    an original replaced since it was read is kept; a vanished one gets an already-absent tombstone."""
    out = tmp_path / "out"
    base = dict(input=str(photo_dir), output=str(out), codec="webp", target_bpp=0.5, shard_size=2)
    first = recompress.run(JobSpec(**base))                         # not verified: nothing may be retired
    assert first["statuses"] == {"ok": 3}
    second = recompress.run(JobSpec(**base, retire_originals=True))
    assert second["items"] == 0 and second["retired_items"] == 0   # rows not verified: originals stay
    assert all(p.exists() for p in (photo_dir / "chelsea.png", photo_dir / "sub dir" / "rocket launch.jpg"))

    (photo_dir / "chelsea.png").write_bytes((photo_dir / "chelsea.png").read_bytes() + b"\0")   # changed
    third = recompress.run(JobSpec(**base, verify=True))            # re-encodes chelsea, verified
    assert third["items"] == 1 and third["changed_items"] == 1

    from ratefit.workers.retire import retire_original
    state = {Path(r["input_uri"]).name: r for r in current_state(*open_fs(str(out))).to_pylist()}
    row = dict(state["chelsea.png"], source_version="mtime:1")     # as if replaced after it was read
    assert retire_original(str(photo_dir / "chelsea.png"), "chelsea.png", row, "x", None, {}) is None
    assert (photo_dir / "chelsea.png").exists()

    (photo_dir / "sub dir" / "ünï" / "café.png").unlink()           # gone by other hands: no tombstone yet
    fourth = recompress.run(JobSpec(**base, retire_originals=True))
    assert fourth["items"] == 0 and fourth["retired_items"] == 1   # chelsea: verified in the third run
    assert not (photo_dir / "chelsea.png").exists() and (photo_dir / "sub dir" / "rocket launch.jpg").exists()
    state = {Path(r["input_uri"]).name: r for r in current_state(*open_fs(str(out))).to_pylist()}
    assert state["chelsea.png"]["retired"] == "deleted" and state["rocket launch.jpg"]["retired"] is None
    assert state["café.png"]["retired"] is None                      # never verified: not ours to record

    # --overwrite cannot lose data: the retired item's row and bitstream are carried over and
    # kept; everything else starts over from the originals.
    chelsea_out = Path(state["chelsea.png"]["output_uri"])
    kept_bytes = chelsea_out.read_bytes()
    redo = recompress.run(JobSpec(**base, verify=True, overwrite=True))
    assert redo["kept_items"] == 1 and redo["new_items"] == 1 and redo["statuses"] == {"ok": 1}
    state = {Path(r["input_uri"]).name: r for r in current_state(*open_fs(str(out))).to_pylist()}
    assert state["chelsea.png"]["retired"] == "deleted" and chelsea_out.read_bytes() == kept_bytes
    assert redo["state"]["inputs"] == 2 and redo["state"]["retired"] == 1


def test_retire_to_moves_originals_on_s3(s3_server, s3fs_client, samples_dir):
    fs, opts = s3fs_client, s3_server.storage_options
    bucket = f"rf-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    for name in PHOTOS[:3]:
        fs.pipe_file(f"{bucket}/in/{name}", (samples_dir / name).read_bytes())
    summary = recompress.run(JobSpec(input=f"s3://{bucket}/in", output=f"s3://{bucket}/out", codec="jpeg",
                                     target_bpp=0.6, storage_options=opts, retire_to=f"s3://{bucket}/attic"))
    assert summary["spec"]["verify"] is True and summary["retired_items"] == 3
    fs.invalidate_cache()
    assert not fs.glob(f"{bucket}/in/*")
    for name in PHOTOS[:3]:
        assert fs.cat_file(f"{bucket}/attic/{name}") == (samples_dir / name).read_bytes()
    tombs = parquet_table(fs.cat_file(fs.glob(f"{bucket}/out/_retired/run=*/part-*.parquet")[0]))
    assert sorted(tombs.column("action").to_pylist()) == ["moved"] * 3
    assert all(m.startswith(f"s3://{bucket}/attic/") for m in tombs.column("moved_to").to_pylist())


def test_spec_refuses_retiring_from_budget_jobs_and_retire_implies_verify():
    with pytest.raises(SpecError, match="retire_originals"):
        JobSpec(input="in", output="out", codec="jpeg", budget_bpp=0.5, retire_originals=True)
    spec = JobSpec(input="in", output="out", codec="jpeg", target_bpp=0.5, retire_to="s3://b/attic")
    assert spec.retire_originals and spec.verify
    assert spec.spec_hash() == JobSpec(input="in", output="out", codec="jpeg", target_bpp=0.5).spec_hash()


def test_a_run_killed_midway_with_retire_originals_loses_no_image(samples_dir, tmp_path):
    """SIGKILL to the driver and its embedded Ray while originals are being retired; after
    that every input is still present or has a committed row whose bitstream decodes to what
    the row says. The next run finishes and retires the rest, one tombstone per input."""
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    names = [f"img{i:02d}.png" for i in range(14)]
    originals = {}
    base = Image.open(samples_dir / "coffee.png").convert("RGB").resize((200, 150))
    for i, name in enumerate(names):   # different pictures, so a mix-up would show
        im = base.rotate(i * 25)
        im.save(src / name)
        originals[name] = np.asarray(im)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "ratefit.jobs.cli", "compress", str(src), str(out), "--codec", "webp",
            "--target-bpp", "0.8", "--shard-size", "1", "--workers", "1", "--no-ms-ssim", "--retire-originals"]
    env = {**os.environ, "CI": "1"}
    job = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and job.poll() is None:
            if len([n for n in names if not (src / n).exists()]) >= 3:
                break
            time.sleep(0.02)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
    gone = [n for n in names if not (src / n).exists()]
    assert 3 <= len(gone) < len(names), f"the run was not killed mid-way ({len(gone)} originals retired)"
    assert not (out / "_SUCCESS").exists()

    def check_nothing_lost() -> dict[str, dict]:
        # Which originals are gone first, then the state: the killed driver's orphaned actors may
        # still commit a part and retire its originals in between, and a row always comes first.
        gone = [name for name in names if not (src / name).exists()]
        state = {Path(r["input_uri"]).name: r for r in current_state(*open_fs(str(out))).to_pylist()}
        for name in gone:
            row = state.get(name)
            assert row is not None and row["status"] == "ok" and row["verified"] is True, (name, row)
            assert _decodes_to(Path(row["output_uri"]).read_bytes(), row["psnr"], originals[name]), name
        return state

    check_nothing_lost()
    time.sleep(2)   # let the orphaned Ray processes notice their driver is gone
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    state = check_nothing_lost()
    assert not any((src / n).exists() for n in names)
    assert all(state[n]["retired"] in ("deleted", "already-absent") for n in names)
    tomb_rows = [r for p in sorted((out / "_retired").rglob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["input_uri"].rsplit("/", 1)[-1] for r in tomb_rows) == names   # one tombstone each
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["state"] == {**summary["state"], "inputs": 14, "statuses": {"ok": 14}, "retired": 14}
    shutil.rmtree(src)


def test_a_nightly_job_whose_codec_or_target_changes_replans_instead_of_refusing(photo_dir, tmp_path):
    """The hash covers what changes bytes for the same input but not what each row records:
    a new target or codec re-encodes the items it applies to, in the same OUTPUT."""
    out = tmp_path / "out"
    base = dict(input=str(photo_dir), output=str(out), shard_size=2, ms_ssim=False, in_process=True)
    first = recompress.run(JobSpec(**base, codec="jpeg", target_bpp=0.8))
    assert first["new_items"] == 3
    again = recompress.run(JobSpec(**base, codec="jpeg", target_bpp=0.8))
    assert again["items"] == 0 and again["unchanged_items"] == 3
    tighter = recompress.run(JobSpec(**base, codec="jpeg", target_bpp=0.5))
    assert tighter["items"] == 3 and tighter["changed_items"] == 3
    other = recompress.run(JobSpec(**base, codec="webp", target_bpp=0.5))
    assert other["items"] == 3 and other["changed_items"] == 3
    state = current_state(*open_fs(str(out))).to_pylist()
    assert len(state) == 3 and {r["codec"] for r in state} == {"webp"} and all(r["bpp"] <= 0.5 for r in state)
    assert all(r["target_value"] == 0.5 for r in state)


def test_a_retired_item_is_kept_when_a_listing_still_names_it(photo_dir, tmp_path, samples_dir):
    """A listing naming an original that a run retired must not turn its ok row into a read
    error (nor ever re-encode its own bitstream): it is kept, and counted as kept."""
    out = tmp_path / "out"
    listing = tmp_path / "list.csv"
    uris = sorted(str(p) for p in photo_dir.rglob("*") if p.is_file())
    listing.write_text("uri\n" + "\n".join(uris) + "\n")
    base = dict(input=str(listing), output=str(out), codec="jpeg", target_bpp=0.8, ms_ssim=False, in_process=True)
    first = recompress.run(JobSpec(**base, retire_originals=True))
    assert first["statuses"] == {"ok": 3} and first["retired_items"] == 3
    assert not any(Path(u).exists() for u in uris)
    second = recompress.run(JobSpec(**{**base, "target_bpp": 0.5}))   # another target: still nothing to re-encode
    assert second["items"] == 0 and second["kept_items"] == 3 and second["changed_items"] == 0
    state = current_state(*open_fs(str(out))).to_pylist()
    assert all(r["status"] == "ok" and r["retired"] == "deleted" for r in state)
    shutil.copy(samples_dir / "astronaut.png", uris[0])            # a new original at a retired URI
    third = recompress.run(JobSpec(**base))
    assert third["items"] == 1 and third["changed_items"] == 1 and third["kept_items"] == 2
