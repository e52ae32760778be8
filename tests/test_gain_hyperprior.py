"""The learned gain-hyperprior codec: gains, coding round trips, rate estimates, weights
identity, cross-device safety of the entropy path, and the trainer.

A small randomly initialised model (exported through the same path as shipped weights) is
enough for the coding properties; rate-distortion figures come from the shipped weights in
the Kodak tests and `ratefit eval`-style runs, not from here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ratefit.codecs import container
from ratefit.codecs.base import CodecError
from ratefit.codecs.gain_hyperprior import GainHyperpriorCodec, export_weights
from ratefit.codecs.gained import GainedHyperprior, ModelConfig
from ratefit.codecs.rate import Target, search
from ratefit.codecs.weights import WeightsError
from ratefit.jobs.tools import train as train_job
from ratefit.workers.codec_loader import read_weights_file
from ratefit.workers.decompress import DecompressConfig, Decompressor
from ratefit.workers.items import Item

TINY = ModelConfig(N=16, M=24, lambdas=(0.002, 0.01, 0.05, 0.2))


def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = GainedHyperprior(TINY)
    with torch.no_grad():   # an untrained analysis gives tiny latents: raise the gains so levels differ
        model.log_gain += 4.0
        model.log_inv_gain -= 4.0
    path.write_bytes(export_weights(model))
    return path


@pytest.fixture(scope="module")
def weights_a(tmp_path_factory) -> Path:
    return _weights(tmp_path_factory.mktemp("w") / "a.safetensors", seed=1)


@pytest.fixture(scope="module")
def weights_b(tmp_path_factory) -> Path:
    return _weights(tmp_path_factory.mktemp("w") / "b.safetensors", seed=2)


@pytest.fixture(scope="module")
def codec(weights_a) -> GainHyperpriorCodec:
    return GainHyperpriorCodec(weights=read_weights_file(str(weights_a)), device="cpu")


@pytest.fixture(scope="module")
def photo(samples_dir) -> np.ndarray:
    # An odd size on purpose: neither side is a multiple of the model's 64-pixel block.
    return np.asarray(Image.open(samples_dir / "chelsea.png").convert("RGB"))[:173, :251].copy()


def test_gains_interpolate_exponentially_between_levels():
    model = GainedHyperprior(TINY)
    with torch.no_grad():
        model.log_gain.copy_(torch.randn_like(model.log_gain))
    g = lambda v: model.gains(torch.tensor([v]))["gain"][0, :, 0, 0]   # noqa: E731
    assert torch.allclose(g(1.0), model.log_gain[1].exp())
    assert torch.allclose(g(2.0), model.log_gain[2].exp())
    assert torch.allclose(g(1.5), (model.log_gain[1].exp() * model.log_gain[2].exp()).sqrt(), rtol=1e-5)
    # Log-linear extrapolation past each end (five levels below, three above), then clamped.
    step_lo, step_hi = model.log_gain[0] - model.log_gain[1], model.log_gain[3] - model.log_gain[2]
    assert torch.allclose(g(-1.0), (model.log_gain[0] + step_lo).exp(), rtol=1e-5)
    assert torch.allclose(g(-5.0), (model.log_gain[0] + 5 * step_lo).exp(), rtol=1e-4)
    assert torch.allclose(g(6.0), (model.log_gain[3] + 3 * step_hi).exp(), rtol=1e-4)
    assert torch.allclose(g(-9.0), g(-5.0)) and torch.allclose(g(99.0), g(6.0))


def test_round_trip_decodes_identically_in_a_fresh_process_state(codec, weights_a, photo):
    prepared = codec.prepare(photo)
    payload = codec.encode(prepared, 1.7)
    first = codec.decode(payload, photo.shape[1], photo.shape[0], 1.7)
    other = GainHyperpriorCodec(weights=read_weights_file(str(weights_a)), device="cpu")   # weights loaded anew
    second = other.decode(payload, photo.shape[1], photo.shape[0], 1.7)
    assert first.shape == photo.shape and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert codec.encode(codec.prepare(photo), 1.7) == payload   # encoding is deterministic


def test_reconstruct_without_entropy_coding_equals_the_real_round_trip(codec, photo):
    prepared = codec.prepare(photo)
    h, w = photo.shape[:2]
    for v in (-0.5, 1.2, 3.7):
        real = codec.decode(codec.encode(prepared, v), w, h, v)
        assert np.array_equal(codec.reconstruct(prepared, v), real)


def test_rate_grows_with_level_and_estimate_tracks_real_size(codec, photo):
    prepared = codec.prepare(photo)
    sizes, estimates = [], []
    for v in (-1.0, 0.0, 1.0, 2.0, 3.0, 4.0):
        sizes.append(len(codec.encode(prepared, v)))
        estimates.append(codec.estimate(prepared, v) / 8)
    assert sizes == sorted(sizes) and sizes[-1] > 1.5 * sizes[0]
    for real, est in zip(sizes, estimates):
        assert abs(est - real) / real < 0.1, (sizes, estimates)


def test_search_hits_a_rate_target_with_few_real_encodes(codec, photo):
    prepared = codec.prepare(photo)
    h, w = photo.shape[:2]
    low = len(codec.encode(prepared, 0.5)) * 8 / (h * w)
    high = len(codec.encode(prepared, 2.5)) * 8 / (h * w)
    overhead = container.header_size(codec.name, codec.weights_sha256)
    for bpp in np.linspace(low, high, 4):
        target = Target("bpp", float(bpp))
        out = search(codec, prepared, photo, target, overhead)
        stored = len(out.payload) + overhead
        ceiling = target.max_bytes(h * w)
        assert out.status == "ok"
        assert stored <= ceiling and stored >= 0.99 * ceiling, (bpp, stored, ceiling)
        assert 1 <= out.encodes <= 3 and out.estimates >= 2


def test_decoder_refuses_other_weights(tmp_path, codec, weights_b, photo):
    h, w = photo.shape[:2]
    prepared = codec.prepare(photo)
    blob = container.pack(codec.name, codec.encode(prepared, 2.0), value=2.0, width=w, height=h,
                          weights_sha256=codec.weights_sha256)
    src = tmp_path / "in" / "cat.png.ghp.rfic"
    src.parent.mkdir()
    src.write_bytes(blob)
    worker = Decompressor(DecompressConfig(output=str(tmp_path / "out"),
                                           codec_options={codec.name: {"weights": str(weights_b), "device": "cpu"}}))
    row = worker(Item(uri=str(src), relpath="cat.png.ghp.rfic"), 0, 1)
    assert row["status"] == "error" and "weights" in row["error"]
    assert codec.weights_sha256.hex()[:16] in row["error"]


def test_corrupt_payloads_give_codec_errors(codec, photo):
    h, w = photo.shape[:2]
    payload = codec.encode(codec.prepare(photo), 2.0)
    with pytest.raises(CodecError):
        codec.decode(payload[:2], w, h, 2.0)
    with pytest.raises(CodecError):
        codec.decode(b"\xff\xff\xff\x00" + payload[4:], w, h, 2.0)
    with pytest.raises(CodecError):
        codec.decode(payload, w, h, 17.0)


def test_weights_that_are_not_ours_are_refused(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="x.safetensors"):
        GainHyperpriorCodec(weights=read_weights_file(str(bad)), device="cpu")
    with pytest.raises(WeightsError):
        GainHyperpriorCodec(weights=read_weights_file(str(tmp_path / "missing.safetensors")), device="cpu")


def test_entropy_path_survives_cross_device_size_perturbations(weights_a, photo):
    """A GPU computes h_s with different rounding than a CPU. In float64 those differences
    are ~1e-15 relative; perturbing the decoder's h_s weights by 1e-12 (a thousand times
    more) must still decode to the very same image, i.e. no scale index flips."""
    enc = GainHyperpriorCodec(weights=read_weights_file(str(weights_a)), device="cpu")
    dec = GainHyperpriorCodec(weights=read_weights_file(str(weights_a)), device="cpu")
    h_s64 = dec.model.h_s64()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in h_s64.parameters():
            p.mul_(1 + 1e-12 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    h, w = photo.shape[:2]
    for v in (0.3, 2.9):
        payload = enc.encode(enc.prepare(photo), v)
        assert np.array_equal(enc.decode(payload, w, h, v), dec.decode(payload, w, h, v))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_and_cpu_bitstreams_decode_identically_both_ways(weights_a, photo):
    cpu = GainHyperpriorCodec(weights=read_weights_file(str(weights_a)), device="cpu")
    gpu = GainHyperpriorCodec(weights=read_weights_file(str(weights_a)), device="cuda")
    h, w = photo.shape[:2]
    for v in (0.0, 1.3, 3.0):
        from_gpu = gpu.encode(gpu.prepare(photo), v)
        from_cpu = cpu.encode(cpu.prepare(photo), v)
        a, b = cpu.decode(from_gpu, w, h, v), gpu.decode(from_gpu, w, h, v)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1   # same symbols; g_s rounding may differ
        c, d = gpu.decode(from_cpu, w, h, v), cpu.decode(from_cpu, w, h, v)
        assert np.abs(c.astype(int) - d.astype(int)).max() <= 1


def test_trainer_smoke_checkpoints_resumes_and_exports(tmp_path, samples_dir):
    data = tmp_path / "photos"
    data.mkdir()
    for name in ("astronaut.png", "coffee.png", "rocket.jpg"):
        (data / name).write_bytes((samples_dir / name).read_bytes())
    out = tmp_path / "run"
    common = ["--data", str(data), "--out", str(out), "--N", "8", "--M", "12", "--levels", "3",
              "--batch-size", "2", "--crop", "64", "--log-every", "1", "--ckpt-every", "2",
              "--device", "cpu"]
    assert train_job.main(common + ["--steps", "3", "--eval", str(data), "--eval-limit", "1", "--eval-every", "3"]) == 0
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 3
    export = tmp_path / "w.safetensors"
    assert train_job.main(common + ["--steps", "5", "--export", str(export)]) == 0
    log = (out / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and [r.split(",")[0] for r in log[1:]] == ["1", "2", "3", "4", "5"]
    assert all(math.isfinite(float(r.split(",")[1])) for r in log[1:])
    assert (out / "eval_log.jsonl").read_text().count('"level"') == 3
    codec = GainHyperpriorCodec(weights=read_weights_file(str(export)), device="cpu")
    # 3 trained levels (0..2); how far the codec extrapolates beyond them is gained.py's business.
    assert codec.model.config.levels == 3 and codec.control.low < 0 and codec.control.high > 2
    img = np.asarray(Image.open(data / "coffee.png").convert("RGB"))[:80, :90].copy()
    assert codec.decode(codec.encode(codec.prepare(img), 1.0), 90, 80, 1.0).shape == img.shape
    assert codec.weights_metadata["trained_steps"] == "5"

    # A later chunk continues from the exported weights and keeps the running total.
    again = tmp_path / "w2.safetensors"
    assert train_job.main(["--data", str(data), "--out", str(tmp_path / "run2"), "--init", str(export),
                           "--steps", "2", "--batch-size", "2", "--crop", "64", "--device", "cpu",
                           "--export", str(again)]) == 0
    continued = GainHyperpriorCodec(weights=read_weights_file(str(again)), device="cpu")
    assert continued.weights_metadata["trained_steps"] == "7"
    assert continued.model.config == codec.model.config


def test_trainer_refuses_kodak(tmp_path):
    data = tmp_path / "kodak"
    data.mkdir()
    Image.new("RGB", (300, 300)).save(data / "kodim01.png")
    with pytest.raises(SystemExit, match="Kodak"):
        train_job.main(["--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"])


@pytest.mark.usefixtures("ray_session")
def test_job_round_trip_through_ray_with_learned_codec(photo_dir, tmp_path, weights_a):
    import pyarrow.dataset as ds

    from ratefit.codecs.metrics import psnr
    from ratefit.jobs import decompress, recompress
    from ratefit.jobs.spec import JobSpec
    from ratefit.workers.read import decode_image

    opts = {"weights": str(weights_a), "device": "cpu"}
    comp, rest = tmp_path / "comp", tmp_path / "rest"
    summary = recompress.run(JobSpec(input=str(photo_dir), output=str(comp), codec="gain-hyperprior",
                                     codec_options=opts, target_bpp=1.2, shard_size=2))
    assert summary["statuses"] == {"ok": 3}
    rows = ds.dataset(str(comp / "_manifest"), format="parquet").to_table().to_pylist()
    for r in rows:
        assert r["bpp"] <= 1.2 and r["bpp"] >= 0.99 * 1.2, r
        assert r["encodes"] == 1 and r["codec"] == "gain-hyperprior"
        header, _ = container.unpack(Path(r["output_uri"]).read_bytes())
        assert header.weights_sha256 == GainHyperpriorCodec(weights=read_weights_file(str(weights_a)), device="cpu").weights_sha256
        assert header.value == pytest.approx(r["rate_param"])
    back = decompress.run(JobSpec(input=str(comp), output=str(rest), kind="decompress",
                                  codec="gain-hyperprior", codec_options=opts))
    assert back["statuses"] == {"ok": 3}
    for r in rows:
        rel = Path(r["output_uri"]).relative_to(comp)
        restored = rest / str(rel).removesuffix(".ghp.rfic")
        restored = restored if restored.suffix == ".png" else restored.with_name(restored.name + ".png")
        original = decode_image(Path(r["input_uri"]).read_bytes()).pixels
        assert psnr(original, np.asarray(Image.open(restored).convert("RGB"))) == pytest.approx(r["psnr"], abs=1e-9)
