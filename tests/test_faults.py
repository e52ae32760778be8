"""Faults injected into real jobs: the S3 server stopped and restarted mid-job, and a
collection of bad and odd inputs on S3 (read by Ray worker processes through a listing),
with the credentials kept out of everything written or logged.

The outage runs over 10 photos are ``slow`` (``make test-slow``); each has a sibling over 4
photos in ``make test`` with the same assertions. The bad-input job is small and always runs.

Elsewhere: a killed worker process (test_job_local.py), a killed driver and its embedded
Ray (test_cli.py), the worker-level faults (a corrupting store, an out-of-memory item,
test_reliability.py) and the decoders under fuzzing (test_decoder_safety.py).
"""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
import time
import uuid
import zlib

import numpy as np
import pytest
from PIL import Image

from ratefit.jobs import recompress
from ratefit.jobs.spec import JobSpec
from ratefit.workers.manifest import parquet_table

pytestmark = pytest.mark.usefixtures("ray_session")


def read_manifest(fs, prefix: str) -> list[dict]:
    fs.invalidate_cache()   # parts were written by other processes since this client last listed
    rows: list[dict] = []
    for path in sorted(fs.glob(f"{prefix}/_manifest/**/*.parquet")):
        rows += parquet_table(fs.cat_file(path)).to_pylist()
    return rows


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------ S3 outage mid-job

OUTAGE_S = 5.0   # longer than the first four retry delays together (0.25 + 0.5 + 1 + 2 s, before jitter)


def expected(n: int) -> list[str]:
    return [f"s3://photos/in/img{i:02d}.png" for i in range(n)]


def _own_s3(tmp_path, samples_dir, n: int):
    """A server of this test's own (the session's must keep running), holding ``n`` photos."""
    import s3fs

    from ratefit.cluster.s3server import S3Server

    server = S3Server(str(tmp_path / "s3")).start()
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
        fs.mkdir("photos")
        photo = (samples_dir / "coffee.png").read_bytes()
        for uri in expected(n):
            fs.pipe_file(uri, photo)
        spec = dict(input="s3://photos/in", output="s3://photos/out", codec="avif", target_bpp=0.6, shard_size=1,
                    workers=2, ms_ssim=False, storage_options=server.storage_options)
        yield server, fs, spec, n
    finally:
        server.stop()


@pytest.fixture()
def own_s3(tmp_path, samples_dir):
    yield from _own_s3(tmp_path, samples_dir, 10)


@pytest.fixture()
def own_s3_few(tmp_path, samples_dir):
    yield from _own_s3(tmp_path, samples_dir, 4)


def _refuses_connections(server) -> bool:
    """Whether nothing answers on the server's S3 port (it is really down, not slow)."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    except OSError:
        return True
    return False


def _start_job(spec: JobSpec, fs) -> tuple[threading.Thread, dict]:
    """Run the job in a thread; return once its first shard is committed and it is still going."""
    result: dict = {}

    def job() -> None:
        try:
            result["summary"] = recompress.run(spec)
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=job)
    t.start()
    _wait_for(lambda: fs.invalidate_cache() or bool(fs.glob("photos/out/_manifest/run=*/part-00000.parquet"))
              or not t.is_alive(), 180, "the first committed shard")
    assert t.is_alive(), "the job ended before the outage could be injected"
    return t, result


def _check_complete(fs, summary: dict, n: int) -> None:
    rows = read_manifest(fs, "photos/out")
    errors = [(r["input_uri"], r["status"], r["error"]) for r in rows if r["status"] != "ok"]
    assert summary["statuses"] == {"ok": n}, (summary, errors)
    assert sorted(r["input_uri"] for r in rows) == expected(n), "every input once"
    for r in rows:
        assert fs.size(r["output_uri"]) == r["output_bytes"], "no row points at a partial file"


@pytest.mark.slow
def test_s3_server_stopped_and_restarted_mid_job(own_s3):
    check_stopped_and_restarted_mid_job(own_s3)


def test_s3_server_stopped_and_restarted_mid_job_over_4_photos(own_s3_few):
    check_stopped_and_restarted_mid_job(own_s3_few)


def check_stopped_and_restarted_mid_job(own: tuple) -> None:
    server, fs, spec, n = own
    job, result = _start_job(JobSpec(**spec), fs)
    fs.invalidate_cache()
    committed_before = len(fs.glob("photos/out/_manifest/run=*/part-*.parquet"))
    server.stop()                  # SIGTERM: the store is gone ...
    down_at = time.monotonic()
    assert _refuses_connections(server), "the store was really down"
    time.sleep(OUTAGE_S)
    outage_s = time.monotonic() - down_at
    server.start()                 # ... and back on the same port with the same data
    job.join(300)
    assert not job.is_alive() and "error" not in result, result
    _check_complete(fs, result["summary"], n)
    assert outage_s >= OUTAGE_S, "the store was down for a real while"   # by the clock, not by how fast weed starts
    assert committed_before < n, "shards were still running when the store went away"


@pytest.mark.slow
def test_a_longer_outage_stops_the_job_clearly_and_a_rerun_resumes(own_s3):
    check_longer_outage_stops_the_job_and_a_rerun_resumes(own_s3)


def test_a_longer_outage_stops_the_job_clearly_and_a_rerun_resumes_over_4_photos(own_s3_few):
    check_longer_outage_stops_the_job_and_a_rerun_resumes(own_s3_few)


def check_longer_outage_stops_the_job_and_a_rerun_resumes(own: tuple) -> None:
    from ratefit.jobs.runner import JobError

    server, fs, spec, n = own
    job, result = _start_job(JobSpec(**spec, storage_retry_s=2), fs)
    server.stop()                  # and it stays down past the 2 s retry window
    job.join(120)
    assert not job.is_alive()
    error = result.get("error")
    assert isinstance(error, JobError), result
    assert "storage unreachable" in str(error) and "re-run the same command" in str(error)
    assert server.secret_key not in str(error)

    server.start()
    summary = recompress.run(JobSpec(**spec))
    assert summary["unchanged_items"] >= 1 and summary["state"]["statuses"] == {"ok": n}
    _check_complete(fs, {"statuses": summary["state"]["statuses"]}, n)


# ------------------------------------------------------------------- bad inputs on S3

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``x``height`` (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bad_and_odd_inputs(photo: Image.Image) -> tuple[dict[str, bytes], dict[str, str]]:
    """(name → bytes, name → expected error fragment); names not in the second must succeed."""
    small = photo.resize((160, 120))
    png = _encoded(small, "PNG")
    jpg = _encoded(small, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [small, small.rotate(90), small.rotate(180)]
    files = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 3],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "text.jpg": b"just some text, not a JPEG\n" * 20,
        "bomb.png": _png_header_only(60000, 60000),
        "one-by-one.png": _encoded(small.resize((1, 1)), "PNG"),
        "one-by-n.png": _encoded(small.resize((1, 300)), "PNG"),
        "n-by-one.png": _encoded(small.resize((300, 1)), "PNG"),
        "gray16.png": _encoded(Image.fromarray((np.asarray(small.convert("L"), dtype=np.uint16) * 257)), "PNG"),
        "gray.png": _encoded(small.convert("L"), "PNG"),
        "palette.png": _encoded(small.convert("P"), "PNG"),
        "rgba.png": _encoded(small.convert("RGBA"), "PNG"),
        "cmyk.jpg": _encoded(small.convert("CMYK"), "JPEG"),
        "exif-rotated.jpg": _encoded(small, "JPEG", exif=exif.tobytes()),
        "photo.tiff": _encoded(small, "TIFF"),
        "animated.gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated.webp": _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "name with spaces ünïcødé.png": png,
    }
    errors = {"empty.png": "file is empty", "truncated.png": "corrupt or truncated",
              "truncated.jpg": "corrupt or truncated", "text.jpg": "not a recognised image format",
              "bomb.png": "60000x60000 = 3600000000 pixels exceeds the limit"}
    return files, errors


def test_bad_and_odd_inputs_on_s3_through_a_listing(s3_server, s3fs_client, samples_dir, caplog, capfd):
    fs = s3fs_client
    bucket = f"rf-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    files, errors = bad_and_odd_inputs(Image.open(samples_dir / "chelsea.png").convert("RGB"))
    for name, data in files.items():
        fs.pipe_file(f"{bucket}/in/{name}", data)
    secret_query = "X-Amz-Signature=TOPSECRETSIGNATURE"
    escapes = {"../escape.png": "escapes the listing's folder", "sub/../../escape2.png": "escapes the listing's folder",
               f"missing.png?{secret_query}": "not found"}
    listing = "uri\n" + "".join(f'"{name}"\n' for name in [*files, *escapes])
    fs.pipe_file(f"{bucket}/in/listing.csv", listing.encode())
    before = set(fs.find(bucket))

    caplog.set_level(logging.DEBUG, logger="ratefit")
    summary = recompress.run(JobSpec(input=f"s3://{bucket}/in/listing.csv", output=f"s3://{bucket}/out",
                                     codec="webp", target_bpp=2.0, shard_size=4, ms_ssim=False,
                                     storage_options=s3_server.storage_options))
    rows = {r["input_uri"].rsplit("/in/", 1)[-1]: r for r in read_manifest(fs, f"{bucket}/out")}
    assert summary["items"] == len(files) + len(escapes) == len(rows)
    for name, fragment in {**errors, **escapes}.items():
        key = name.split("?")[0] if "?" in name else name
        match = [r for k, r in rows.items() if k.startswith(key)]
        assert len(match) == 1, name
        assert match[0]["status"] == "error" and fragment in match[0]["error"], (name, match[0]["error"])
    for name in set(files) - set(errors):
        r = rows[name]
        # Tiny images may not reach 2 bpp: 'unreachable' still writes the nearest result and says
        # why; a result not smaller than its input is 'skipped' and writes nothing.
        assert r["status"] in ("ok", "unreachable", "skipped"), (name, r["error"])
        if r["status"] == "skipped":
            assert r["output_uri"] is None and r["candidate_bytes"] >= r["input_bytes"], name
            continue
        assert r["output_bytes"] < r["input_bytes"], name
        assert fs.size(r["output_uri"]) == r["output_bytes"] and r["output_uri"].startswith(f"s3://{bucket}/out/")
    assert (rows["exif-rotated.jpg"]["width"], rows["exif-rotated.jpg"]["height"]) == (120, 160)
    assert rows["gray16.png"]["original_mode"].startswith("I;16")
    assert rows["cmyk.jpg"]["original_mode"] == "CMYK"

    # Nothing was written outside OUTPUT.
    new = set(fs.find(bucket)) - before
    assert new and all(p.startswith(f"{bucket}/out/") for p in new), sorted(new)[:5]

    # Neither the secret key nor a signed URL's signature reaches anything written or logged.
    written = "".join(fs.cat_file(p).decode("utf-8", "replace") for p in new
                      if p.endswith((".parquet", ".json", "_SUCCESS")))
    logged = caplog.text + "".join(capfd.readouterr())
    for text in (written, logged, json.dumps(list(rows.values()))):
        assert s3_server.secret_key not in text
        assert "TOPSECRETSIGNATURE" not in text
