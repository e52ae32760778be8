"""The `ratefit` command line as a user runs it: separate processes, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

RATEFIT = [sys.executable, "-m", "ratefit.jobs.cli"]


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "1"}
    return subprocess.run(RATEFIT + args, capture_output=True, text=True, timeout=timeout, env=env)


def test_codecs_lists_the_builtin_codecs():
    proc = run(["codecs"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    names = {line.split()[0] for line in lines[1:]}
    assert {"avif", "jpeg", "webp", "gain-hyperprior"} <= names
    assert any(line.startswith("gain-hyperprior") and "continuous" in line for line in lines)
    assert any(line.startswith("avif") and "discrete" in line and "0..100" in line for line in lines)


def test_compress_without_codec_uses_the_learned_default_and_decompress_restores(samples_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "chelsea.png").write_bytes((samples_dir / "chelsea.png").read_bytes())
    out, back = tmp_path / "out", tmp_path / "back"
    proc = run(["compress", str(src), str(out), "--target-bpp", "0.8", "--workers", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["spec"]["codec"] == "gain-hyperprior" and success["statuses"] == {"ok": 1}
    info = json.loads(run(["inspect", str(out / "chelsea.png.ghp.rfic")]).stdout)
    assert info["codec"] == "gain-hyperprior" and len(info["weights_sha256"]) == 64 and info["bpp"] <= 0.8
    proc = run(["decompress", str(out), str(back), "--workers", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (back / "chelsea.png").exists()


def test_bad_invocations_fail_with_one_clear_line(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    invocations = [["compress", str(tmp_path), str(tmp_path / "out")],
                   ["compress", str(tmp_path), str(tmp_path / "out"), "--target-bpp", "0.5", "--codec", "nope"],
                   ["compress", str(tmp_path / "missing"), str(tmp_path / "out"), "--target-bpp", "0.5"],
                   ["compress", str(tmp_path), str(tmp_path / "out"), "--target-bpp", "0.5", "--refine-steps", "-3"]]
    with ThreadPoolExecutor(2) as pool:   # each its own process, two at a time (most of each is start-up)
        no_target, bad_codec, missing, bad_refine = pool.map(run, invocations)
    proc = no_target
    assert proc.returncode == 2 and "no target" in proc.stderr and "Traceback" not in proc.stderr
    proc = bad_codec
    assert proc.returncode == 2 and "unknown 'nope'" in proc.stderr
    proc = missing
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = bad_refine
    assert proc.returncode == 2 and "refine_steps" in proc.stderr and "Traceback" not in proc.stderr


def test_refine_steps_flag_reaches_the_spec(tmp_path):
    import argparse

    from ratefit.jobs.cli import add_compress_arguments, spec_from_args

    parser = argparse.ArgumentParser()
    add_compress_arguments(parser)
    args = parser.parse_args([str(tmp_path), str(tmp_path / "out"), "--target-bpp", "0.5", "--refine-steps", "25"])
    assert spec_from_args(args).refine_steps == 25


def test_compress_inspect_and_spec_file_with_flag_override(photo_dir, tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"input": str(photo_dir), "output": str(tmp_path / "ignored"),
                                "codec": "webp", "target_bpp": 2.0, "shard_size": 2}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ratefit.jobs.recompress", "--spec", str(spec), str(photo_dir), str(out),
                           "--target-bytes", "7000"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 items: 3 ok" in proc.stdout and "_SUCCESS" in proc.stdout
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["spec"]["codec"] == "webp" and success["spec"]["target_bytes"] == 7000.0
    assert success["spec"]["target_bpp"] is None and success["spec"]["shard_size"] == 2

    bitstream = out / "chelsea.png.webp"   # a plain WebP file: its codec and rate value are in its row
    proc = run(["inspect", str(bitstream)])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    row = next(r for r in pq.read_table(str(out / "_manifest")).to_pylist() if r["input_uri"].endswith("chelsea.png"))
    assert info["format"] == "WEBP" and (info["width"], info["height"]) == (451, 300)
    assert info["file_bytes"] == row["output_bytes"] == bitstream.stat().st_size <= 7000
    assert row["codec"] == "webp" and row["rate_param"] is not None

    junk = tmp_path / "junk.rfic"
    junk.write_bytes(b"definitely not a container")
    proc = run(["inspect", str(junk)])
    assert proc.returncode == 2 and "not a ratefit container" in proc.stderr and str(junk) in proc.stderr


def test_killed_job_resumes_to_a_complete_manifest(samples_dir, tmp_path):
    """Kill the whole job (driver and its embedded Ray) mid-way, re-run, check the manifest."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(14):
        (src / f"img{i:02d}.png").write_bytes((samples_dir / ("chelsea.png" if i % 2 else "coffee.png")).read_bytes())
    out = tmp_path / "out"
    args = RATEFIT + ["compress", str(src), str(out), "--codec", "avif", "--target-bpp", "0.8",
                      "--shard-size", "1", "--workers", "1", "--no-ms-ssim"]
    env = {**os.environ, "CI": "1"}
    job = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    manifest = out / "_manifest"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            done = list(manifest.rglob("part-*.parquet")) if manifest.exists() else []
            if len(done) >= 3 or job.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
    killed_with = len(list(manifest.rglob("part-*.parquet")))
    assert 3 <= killed_with < 14, f"the job was not killed mid-way ({killed_with} parts)"
    assert not (out / "_SUCCESS").exists()
    time.sleep(2)   # let the orphaned Ray processes notice their driver is gone

    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "_SUCCESS").read_text())
    # The re-run is a new run: the killed one's committed rows stand, the rest is planned.
    assert summary["unchanged_items"] >= killed_with and summary["items"] + summary["unchanged_items"] == 14
    assert summary["statuses"] == {"ok": summary["items"]} and summary["state"]["statuses"] == {"ok": 14}
    uris = pq.read_table(str(manifest)).column("input_uri").to_pylist()
    assert sorted(uris) == sorted(str(p) for p in src.iterdir())
    for row in pq.read_table(str(manifest)).to_pylist():
        assert Path(row["output_uri"]).stat().st_size == row["output_bytes"]
