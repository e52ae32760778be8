"""CompressAI zoo models as ratefit codecs, offline.

Checkpoints are made here in the zoo's format: trained ``mbt2018-mean`` networks exported
from the bundled gain-hyperprior model (an exact fold of its gains, see zoo_export.py), and
small randomly initialised networks for the other architectures (their analysis output
scaled up, so the latent has real spread and rate moves with the quantisation step).
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image

from ratefit.codecs import container
from ratefit.codecs.base import CodecError, payload_weights_sha256
from ratefit.codecs.gain_hyperprior import BUNDLED_WEIGHTS, load_model
from ratefit.codecs.metrics import psnr
from ratefit.codecs.rate import Target, search
from ratefit.codecs.registry import describe
from ratefit.codecs.weights import WeightsError, bundled_weights
from ratefit.codecs.zoo import VBR_GRID, _FIXED_HEAD, _VBR_HEAD
from ratefit.codecs.zoo_export import checkpoint_bytes, mbt2018_mean_state
from ratefit.jobs import decompress, recompress
from ratefit.jobs.spec import JobSpec
from ratefit.workers.codec_loader import load_codec

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from compressai import models


def _photo(samples_dir: Path, name: str = "chelsea.png") -> np.ndarray:
    return np.asarray(Image.open(samples_dir / name).convert("RGB"))


def _random_state(cls, N: int, M: int, seed: int, spread: float = 40.0, **kwargs) -> dict:
    torch.manual_seed(seed)
    model = cls(N, M, **kwargs)
    with torch.no_grad():
        model.g_a[6].weight.mul_(spread)
        model.g_a[6].bias.mul_(spread)
    model.update(force=True)
    return model.state_dict()


@pytest.fixture(scope="module")
def trained_mbt(tmp_path_factory) -> Path:
    """mbt2018-mean qualities 2, 4 and 6, exported from the bundled trained model."""
    folder = tmp_path_factory.mktemp("mbt2018-mean")
    model, _, _ = load_model(bundled_weights(BUNDLED_WEIGHTS), torch.device("cpu"))
    for level in (1, 3, 5):
        data = checkpoint_bytes(mbt2018_mean_state(model, level))
        (folder / f"mbt2018-mean-{level + 1}-{hashlib.sha256(data).hexdigest()[:8]}.pth.tar").write_bytes(data)
    (folder / "notes.txt").write_text("not a checkpoint")
    (folder / "bmshj2018-hyperprior-3-00000000.pth.tar").write_bytes(b"another model's name: ignored")
    return folder


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    for q, seed in ((1, 1), (3, 2)):
        torch.save(_random_state(models.ScaleHyperprior, 32, 48, seed, spread=20.0 * q),
                   folder / f"bmshj2018-hyperprior-{q}-0000{q}aaa.pth.tar")
    torch.save(_random_state(models.MeanScaleHyperpriorVbr, 32, 48, 3, vr_entbttlnck=True),
               folder / "mbt2018-mean-mse-vbr-12345678.pth.tar")
    torch.save(_random_state(models.JointAutoregressiveHierarchicalPriors, 32, 48, 4),
               folder / "mbt2018-1-0000aaaa.pth.tar")
    torch.save(_random_state(models.JointAutoregressiveHierarchicalPriors, 32, 48, 5, spread=120.0),
               folder / "mbt2018-2-0000bbbb.pth.tar")
    return folder


# ------------------------------------------------------------------------------------ listing

def test_every_zoo_codec_is_described_without_weights():
    fixed = describe("compressai:mbt2018-mean")
    assert (fixed["kind"], fixed["speed"], fixed["needs"]) == ("continuous", "fast", "--weights")
    assert describe("compressai:mbt2018-mean-vbr")["kind"] == "continuous"
    for slow in ("compressai:mbt2018", "compressai:cheng2020-anchor", "compressai:cheng2020-attn"):
        assert describe(slow)["speed"] == "slow" and describe(slow)["kind"] == "discrete"
    with pytest.raises(CodecError, match="needs weights"):
        load_codec("compressai:mbt2018-mean")
    with pytest.raises(KeyError, match="CompressAI zoo models ratefit runs"):
        load_codec("compressai:no-such-model")


# ------------------------------------------------------------------------- fixed-rate with Δ

def test_export_is_the_gained_model_at_that_level(samples_dir, trained_mbt):
    """The zoo codec at network k with Δ = 1 prices an image as the gained model at that level."""
    img = _photo(samples_dir)
    gained = load_codec("gain-hyperprior", device="cpu")
    zoo = load_codec("compressai:mbt2018-mean", weights=str(trained_mbt), device="cpu")
    assert [s.quality for s in zoo.sources] == [2, 4, 6]
    pz, pg = zoo.prepare(img), gained.prepare(img)
    for k, level in ((1, 1), (2, 3), (3, 5)):
        ours, theirs = zoo.estimate(pz, float(k)), gained.estimate(pg, float(level))
        assert ours == pytest.approx(theirs, rel=0.005)
        assert psnr(img, zoo.reconstruct(pz, float(k))) == pytest.approx(psnr(img, gained.reconstruct(pg, float(level))),
                                                                         abs=0.02)


def test_fixed_rate_codec_is_continuous_and_monotone_across_networks(samples_dir, trained_mbt):
    img = _photo(samples_dir, "coffee.png")
    codec = load_codec("compressai:mbt2018-mean", weights=str(trained_mbt), device="cpu")
    prep = codec.prepare(img)
    n = len(codec.sources)
    values = np.linspace(0.0, n + 1.0, 4 * (n + 1) + 1)
    bits = [codec.estimate(prep, float(v)) for v in values]
    assert all(b2 >= b1 for b1, b2 in zip(bits, bits[1:])), bits
    for k in range(1, n):                       # no jump where one network hands over to the next
        below, above = codec.estimate(prep, float(k)), codec.estimate(prep, k + 1e-6)
        assert above == pytest.approx(below, rel=0.01)
        assert 1.0 < prep.junctions[k + 1] < 8.0
    # A real encode: the estimate is a tight ceiling, decoding equals the encoder's reconstruction.
    for v in (0.0, 0.7, 1.0, 1.5, 2.5, n + 0.5):
        payload = codec.encode(prep, float(v))
        est = codec.estimate(prep, float(v)) / 8
        assert len(payload) <= est <= len(payload) + 32
        quality, step, _ = _FIXED_HEAD.unpack_from(payload)
        assert quality == codec.sources[min(max(int(np.ceil(v)), 1), n) - 1].quality
        assert (step > 1.0) == (0 < v < n and v != int(v)) or v == 0.0
        decoded = codec.decode(payload, img.shape[1], img.shape[0], float(v))
        assert np.array_equal(decoded, codec.reconstruct(prep, float(v)))


def test_target_search_lands_within_one_percent_below(samples_dir, trained_mbt):
    codec = load_codec("compressai:mbt2018-mean", weights=str(trained_mbt), device="cpu")
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        img = _photo(samples_dir, name)
        pixels = img.shape[0] * img.shape[1]
        for bpp in (0.15, 0.4, 0.9):
            out = search(codec, codec.prepare(img), img, Target("bpp", bpp), 120)
            assert out.status == "ok", (name, bpp, out.reason)
            got = (len(out.payload) + 120) * 8 / pixels
            assert 0.99 * bpp <= got <= bpp, (name, bpp, got)
            assert out.encodes <= 2


def test_job_round_trip_with_headers_naming_the_network(tmp_path, photo_dir, trained_mbt, ray_session):
    out, back = tmp_path / "out", tmp_path / "back"
    summary = recompress.run(JobSpec(input=str(photo_dir), output=str(out), codec="compressai:mbt2018-mean",
                                     weights=str(trained_mbt), target_bpp=0.5, workers=1, progress=False,
                                     verify=True))
    assert summary["statuses"] == {"ok": 3} and summary["verify_failures"] == 0
    shas = {hashlib.sha256(p.read_bytes()).digest(): p for p in trained_mbt.glob("mbt2018-mean-*")}
    rows = ds.dataset(str(out / "_manifest")).to_table().to_pylist()
    for row in rows:
        assert 0.99 * 0.5 <= row["bpp"] <= 0.5
        header, payload = container.unpack(Path(row["output_uri"]).read_bytes())
        assert header.codec == "compressai:mbt2018-mean"
        assert header.weights_sha256 in shas   # the very network that wrote it
        assert shas[header.weights_sha256].name.startswith(f"mbt2018-mean-{payload[0]}-")
    summary = decompress.run(JobSpec(input=str(out), output=str(back), kind="decompress",
                                     weights=str(trained_mbt), workers=1, progress=False))
    assert summary["statuses"] == {"ok": 3}
    for row in rows:
        rel = Path(row["input_uri"]).relative_to(photo_dir)
        restored = np.asarray(Image.open(back / (str(rel) if str(rel).endswith(".png") else f"{rel}.png")))
        original = np.asarray(Image.open(row["input_uri"]).convert("RGB"))
        assert psnr(original, restored) == pytest.approx(row["psnr"], abs=1e-9)


def test_containers_are_refused_by_other_weights(tmp_path, samples_dir, trained_mbt, small_weights):
    img = _photo(samples_dir)
    codec = load_codec("compressai:mbt2018-mean", weights=str(trained_mbt), device="cpu")
    payload = codec.encode(codec.prepare(img), 1.0)
    blob = container.pack(codec.name, payload, value=1.0, width=img.shape[1], height=img.shape[0],
                          weights_sha256=payload_weights_sha256(codec, payload))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png.mbt2018-mean.rfic").write_bytes(blob)
    # Same file names and qualities, other contents: a retrained set.
    other = tmp_path / "other"
    other.mkdir()
    for p in trained_mbt.glob("mbt2018-mean-*"):
        state = torch.load(p, weights_only=True)
        state["g_s.6.bias"] = state["g_s.6.bias"] + 0.01
        torch.save(state, other / p.name)
    summary = decompress.run(JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "back"), kind="decompress",
                                     weights=str(other), workers=1, progress=False))
    assert summary["statuses"] == {"error": 1}
    row = ds.dataset(str(tmp_path / "back" / "_manifest")).to_table().to_pylist()[0]
    assert "written with compressai:mbt2018-mean weights" in row["error"]
    # Weights of another architecture do not load at all, with the mismatch named.
    with pytest.raises(WeightsError, match="does not fit compressai:bmshj2018-hyperprior"):
        load_codec("compressai:bmshj2018-hyperprior", weights=str(next(trained_mbt.glob("mbt2018-mean-2-*"))))
    # A folder without any checkpoint of the model says what it looked for.
    with pytest.raises(WeightsError, match=r"looked for cheng2020-anchor-<quality>"):
        load_codec("compressai:cheng2020-anchor", weights=str(trained_mbt))


def test_checkpoints_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path("/").joinpath, ("pwned",))

    path = tmp_path / "bmshj2018-hyperprior-1-deadbeef.pth.tar"
    torch.save({"g_a.0.weight": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_codec("compressai:bmshj2018-hyperprior", weights=str(path))
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="not a checkpoint"):
        load_codec("compressai:bmshj2018-hyperprior", weights=str(tmp_path / "junk.pth"))


def test_scale_hyperprior_and_a_training_checkpoint(tmp_path, samples_dir, small_weights):
    """bmshj2018-hyperprior (scale-only, |y| into h_a) through the same Δ path; a training
    checkpoint (``{"state_dict": …}``, DataParallel names) loads as the zoo's files do."""
    img = _photo(samples_dir, "coffee.png")
    src = next(small_weights.glob("bmshj2018-hyperprior-3-*"))
    wrapped = tmp_path / "checkpoint_best_loss.pth.tar"
    state = torch.load(src, weights_only=True)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    codec = load_codec("compressai:bmshj2018-hyperprior", weights=str(wrapped), device="cpu")
    assert [s.quality for s in codec.sources] == [0]       # a single network of unknown quality
    prep = codec.prepare(img)
    sizes = [len(codec.encode(prep, v)) for v in (0.0, 0.5, 1.0, 1.5, 2.0)]
    assert sizes == sorted(sizes) and sizes[-1] > 1.5 * sizes[0]
    out = search(codec, prep, img, Target("bytes", (sizes[1] + sizes[2]) / 2 + 100), 100)
    assert out.status == "ok" and 0.99 * (sizes[1] + sizes[2]) / 2 <= len(out.payload) <= (sizes[1] + sizes[2]) / 2
    assert np.array_equal(codec.decode(out.payload, img.shape[1], img.shape[0], out.value),
                          codec.reconstruct(prep, out.value))
    with pytest.raises(CodecError):
        codec.decode(out.payload[:3], img.shape[1], img.shape[0], out.value)


# ------------------------------------------------------------------------------------------ VBR

def test_vbr_grid_tables_and_concurrent_encodes(samples_dir, small_weights):
    img = _photo(samples_dir, "rocket.jpg")
    codec = load_codec("compressai:mbt2018-mean-vbr", weights=str(small_weights), device="cpu")
    assert len(codec.net.grid) == VBR_GRID and codec.control.high == 7.0
    prep = codec.prepare(img)
    sizes = []
    for v in np.linspace(0, 7, 15):
        payload = codec.encode(prep, float(v))
        index, grid, _ = _VBR_HEAD.unpack_from(payload)
        assert grid == VBR_GRID and index == round(v / 7 * (VBR_GRID - 1))
        assert len(payload) <= codec.estimate(prep, float(v)) / 8 <= len(payload) + 32
        sizes.append(len(payload))
    assert sizes == sorted(sizes) and sizes[-1] > 4 * sizes[0]
    values = [0.3, 2.2, 4.9, 6.6] * 3
    serial = {v: codec.encode(codec.prepare(img), v) for v in set(values)}
    results: dict[int, bytes] = {}

    def work(i: int, v: float) -> None:
        results[i] = codec.encode(codec.prepare(img), v)

    threads = [threading.Thread(target=work, args=(i, v)) for i, v in enumerate(values)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == serial[v] for i, v in enumerate(values))
    bad = bytearray(serial[2.2])
    bad[1] = 32   # a payload from a grid of another size
    with pytest.raises(CodecError, match="grid of 32"):
        codec.decode(bytes(bad), img.shape[1], img.shape[0], 2.2)
    out = search(codec, prep, img, Target("bpp", 1.0), 100)
    got = (len(out.payload) + 100) * 8 / (img.shape[0] * img.shape[1])
    assert out.status == "ok" and 0.99 <= got <= 1.0
    decoded = codec.decode(out.payload, img.shape[1], img.shape[0], out.value)
    assert np.array_equal(decoded, codec.reconstruct(prep, out.value))


# ------------------------------------------------------------------------------ autoregressive

def test_autoregressive_networks_are_a_discrete_slow_codec(samples_dir, small_weights):
    img = _photo(samples_dir)[:128, :192]
    codec = load_codec("compressai:mbt2018", weights=str(small_weights))
    assert codec.speed == "slow" and codec.device == "cpu" and codec.control.discrete
    assert (codec.control.low, codec.control.high) == (1.0, 2.0)
    prep = codec.prepare(img)
    small, large = codec.encode(prep, 1.0), codec.encode(prep, 2.0)
    assert len(large) > len(small)
    assert codec.decode(large, 192, 128, 2.0).shape == (128, 192, 3)
    out = search(codec, prep, img, Target("bytes", (len(small) + len(large)) // 2 + 50), 50)
    assert out.status == "ok" and out.payload == small
    assert payload_weights_sha256(codec, large) == hashlib.sha256(
        next(small_weights.glob("mbt2018-2-*")).read_bytes()).digest()


# ----------------------------------------------------------------------------- sources of weights

def test_weights_from_s3_and_from_the_zoo_cache(tmp_path, monkeypatch, samples_dir, small_weights, s3_server,
                                                s3fs_client, ray_session):
    fs = s3fs_client
    bucket = "zoo-weights"
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for p in small_weights.glob("bmshj2018-hyperprior-*"):
        fs.put_file(str(p), f"{bucket}/checkpoints/{p.name}")
    photos = tmp_path / "in"
    photos.mkdir()
    (photos / "chelsea.png").write_bytes((samples_dir / "chelsea.png").read_bytes())
    local = load_codec("compressai:bmshj2018-hyperprior", weights=str(small_weights), device="cpu")
    target = len(local.encode(local.prepare(_photo(samples_dir)), 1.3)) + 200   # inside these networks' range
    spec = JobSpec(input=str(photos), output=str(tmp_path / "out"), codec="compressai:bmshj2018-hyperprior",
                   weights=f"s3://{bucket}/checkpoints/", storage_options=s3_server.storage_options,
                   target_bytes=target, workers=1, progress=False)
    assert spec.codec_kwargs()["storage_options"] == s3_server.storage_options
    summary = recompress.run(spec)
    assert summary["statuses"] == {"ok": 1}
    row = ds.dataset(str(tmp_path / "out" / "_manifest")).to_table().to_pylist()[0]
    assert 0.99 * target <= row["output_bytes"] <= target
    # --weights zoo: torch.hub's cache is used as is (no download when the file is there).
    hub = tmp_path / "torch-home"
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    src = next(small_weights.glob("bmshj2018-hyperprior-1-*"))
    (hub / "hub" / "checkpoints" / "bmshj2018-hyperprior-1-7eb97409.pth.tar").write_bytes(src.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(hub))
    codec = load_codec("compressai:bmshj2018-hyperprior", weights="zoo", device="cpu")
    assert [s.quality for s in codec.sources] == list(range(1, 9))
    img = _photo(samples_dir)
    payload = codec.encode(codec.prepare(img), 0.5)        # network 1 only: the others are never fetched
    assert payload[0] == 1
    assert payload_weights_sha256(codec, payload) == hashlib.sha256(src.read_bytes()).digest()


def test_in_memory_checkpoint_bytes_round_trip():
    state = _random_state(models.ScaleHyperprior, 8, 12, 0)
    loaded = torch.load(io.BytesIO(checkpoint_bytes(state)), weights_only=True)
    assert set(loaded) == set(state)


# ------------------------------------------------------------------------ the Kodak run

TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"


@pytest.mark.slow
def test_kodak_zoo_jobs_meet_per_item_targets_and_round_trip(tmp_path, kodak_dir, ray_session):
    """Issue 6's acceptance run: Kodak with per-item targets (0.25/0.5/1.0 bpp in turn) through
    compressai:mbt2018-mean-vbr (one file) and compressai:bmshj2018-hyperprior (two networks
    and the quantisation step between them), then ``ratefit decompress``. Every in-range item
    is at most its target and within 1% of it; out-of-range ones are ``unreachable`` at the end
    of the range; restored PNGs match the manifest's PSNR.

    Weights are made offline: the VBR file from the bundled model (zoo_export), the scale-only
    hyperprior fitted briefly on ../shared/data/train (never Kodak)."""
    check_zoo_jobs_meet_per_item_targets(tmp_path, sorted(kodak_dir.glob("kodim*.png")), fit_photos=64,
                                         fit_steps=400, min_ok=20)


def test_few_kodak_zoo_jobs_meet_per_item_targets_and_round_trip(tmp_path, kodak_dir, ray_session):
    """The acceptance run's sibling in ``make test``: the first 3 Kodak photos (one per target),
    the hyperprior fitted on 16 training photos for 60 steps; the same assertions, with at most
    one of 3 ``unreachable`` as the full run allows 4 of 24 (kodim01 at 0.25 bpp is, for the VBR
    model: below its lowest rate)."""
    check_zoo_jobs_meet_per_item_targets(tmp_path, sorted(kodak_dir.glob("kodim*.png"))[:3], fit_photos=16,
                                         fit_steps=60, min_ok=2)


def check_zoo_jobs_meet_per_item_targets(tmp_path: Path, files: list[Path], fit_photos: int, fit_steps: int,
                                         min_ok: int) -> None:
    import csv

    from ratefit.codecs.zoo_export import bmshj2018_hyperprior_state, export

    if not TRAIN.is_dir():
        pytest.skip(f"training photos not found at {TRAIN} (../shared/data/train)")
    model, _, _ = load_model(bundled_weights(BUNDLED_WEIGHTS), torch.device("cpu"))
    (vbr_file,) = export(model, str(tmp_path / "vbr"), "mbt2018-mean-vbr")
    photos = sorted(str(p) for p in TRAIN.glob("*.jpg"))[:fit_photos]
    fitted = tmp_path / "bmshj"
    fitted.mkdir()
    for level in (2, 4):
        torch.save(bmshj2018_hyperprior_state(model, level, photos, steps=fit_steps),
                   fitted / f"bmshj2018-hyperprior-{level + 1}.pth.tar")
    listing = tmp_path / "kodak.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "target_bpp"])
        for i, p in enumerate(files):
            w.writerow([str(p), (0.25, 0.5, 1.0)[i % 3]])
    for codec, weights in (("compressai:mbt2018-mean-vbr", vbr_file), ("compressai:bmshj2018-hyperprior", str(fitted))):
        out, back = tmp_path / codec.split(":")[1], tmp_path / (codec.split(":")[1] + "-back")
        recompress.run(JobSpec(input=str(listing), output=str(out), codec=codec, weights=weights, ms_ssim=False,
                               workers=2, shard_size=4, progress=False))
        rows = ds.dataset(str(out / "_manifest")).to_table().to_pylist()
        assert len(rows) == len(files)
        ok = [r for r in rows if r["status"] == "ok"]
        assert len(ok) >= min_ok, [(r["input_uri"], r["status"], r["error"]) for r in rows]
        for r in rows:
            if r["status"] == "ok":
                assert 0.99 * r["target_value"] <= r["bpp"] <= r["target_value"], r
            else:
                assert r["status"] == "unreachable" and "lowest rate" in r["error"], r
        summary = decompress.run(JobSpec(input=str(out), output=str(back), kind="decompress", weights=weights,
                                         workers=2, progress=False))
        assert summary["statuses"] == {"ok": len(files)}
        for r in rows:
            restored = np.asarray(Image.open(str(back) + r["input_uri"]))
            original = np.asarray(Image.open(r["input_uri"]).convert("RGB"))
            assert psnr(original, restored) == pytest.approx(r["psnr"], abs=1e-9)
        print(f"{codec}: {len(ok)}/{len(rows)} ok, achieved/target "
              f"{min(r['bpp'] / r['target_value'] for r in ok):.4f}..{max(r['bpp'] / r['target_value'] for r in ok):.4f}")


def test_weights_over_http_from_a_loopback_server(samples_dir, small_weights):
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(small_weights))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        name = next(small_weights.glob("bmshj2018-hyperprior-3-*")).name
        codec = load_codec("compressai:bmshj2018-hyperprior", device="cpu",
                          weights=f"http://127.0.0.1:{server.server_address[1]}/{name}")
        assert [s.quality for s in codec.sources] == [3]
        img = _photo(samples_dir)
        payload = codec.encode(codec.prepare(img), 1.0)
        assert payload_weights_sha256(codec, payload) == hashlib.sha256((small_weights / name).read_bytes()).digest()
    finally:
        server.shutdown()
