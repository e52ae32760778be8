"""Encoder-side latent refinement (``--refine-steps``): better streams for the unchanged decoder.

Quality gains are a property of a trained model, so these tests use the bundled weights on
small crops of the bundled photos (CPU, a few seconds each); the Kodak figures come from
``tests/measure_refine.py``.
"""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image

from ratefit.codecs import container
from ratefit.codecs.base import CodecError
from ratefit.codecs.gain_hyperprior import GainHyperpriorCodec
from ratefit.codecs.metrics import psnr
from ratefit.codecs.rate import Target, search
from ratefit.codecs.refine import Z_HALO, _windows, lambda_at, sga_round
from ratefit.jobs.spec import JobSpec, SpecError
from ratefit.workers.compress import CompressConfig, Compressor

STEPS = 40


@pytest.fixture(scope="module")
def codec() -> GainHyperpriorCodec:
    return GainHyperpriorCodec(device="cpu")


@pytest.fixture(scope="module")
def crop(samples_dir) -> np.ndarray:
    # An odd size: the padding's pixels must not count as distortion.
    return np.asarray(Image.open(samples_dir / "astronaut.png").convert("RGB"))[40:200, 150:333].copy()


def _objective(codec, prepared, image, v) -> float:
    bpp = codec.estimate(prepared, v) / (image.shape[0] * image.shape[1])
    mse = ((codec.reconstruct(prepared, v).astype(float) - image) ** 2).mean() / 255 ** 2
    return bpp + lambda_at(codec.model, v) * 255 ** 2 * mse


def test_refinement_lowers_the_rd_objective_it_optimises(codec, crop):
    p = codec.prepare(crop)
    for v in (2.5, 4.0):
        q = codec.refine(p, crop, v, STEPS)
        assert q.refine_steps == STEPS and q.dz is not None
        assert _objective(codec, q, crop, v) < 0.99 * _objective(codec, p, crop, v)


def test_refined_stream_decodes_with_an_unchanged_decoder_at_higher_psnr_for_the_same_ceiling(codec, crop):
    h, w = crop.shape[:2]
    target = Target("bpp", 0.6)
    overhead = container.header_size(codec.name, codec.weights_sha256, "RGB")
    p = codec.prepare(crop)
    plain = search(codec, p, crop, target, overhead)
    v0 = plain.value
    refined_prep = codec.refine(p, crop, v0, STEPS)
    refined = search(codec, refined_prep, crop, target, overhead)
    ceiling = target.max_bytes(w * h) - overhead
    assert plain.status == refined.status == "ok"
    assert len(refined.payload) <= ceiling and len(refined.payload) >= 0.99 * ceiling
    assert refined.encodes <= 2
    fresh = GainHyperpriorCodec(device="cpu")     # a decoder that never saw the refinement
    decoded = fresh.decode(refined.payload, w, h, refined.value)
    assert np.array_equal(decoded, codec.reconstruct(refined_prep, refined.value))
    plain_psnr = psnr(crop, fresh.decode(plain.payload, w, h, plain.value))
    assert psnr(crop, decoded) > plain_psnr + 0.05


def test_refinement_is_repeatable_and_zero_steps_change_nothing(codec, crop):
    p = codec.prepare(crop)
    assert codec.refine(p, crop, 3.0, 0) is p
    a, b = codec.refine(p, crop, 3.0, 5), codec.refine(p, crop, 3.0, 5)
    assert torch.equal(a.y, b.y) and torch.equal(a.dz, b.dz)
    assert codec.encode(a, 3.0) == codec.encode(b, 3.0)


def test_windows_cover_the_latent_once_with_a_halo():
    rows, cols, tile = 11, 7, 4
    seen = np.zeros((rows, cols), int)
    for wr, wc, ir, ic in _windows(rows, cols, tile):
        assert wr.start >= 0 and wr.stop <= rows and wc.start >= 0 and wc.stop <= cols
        inner_r = range(wr.start + ir.start, wr.start + ir.stop)
        inner_c = range(wc.start + ic.start, wc.start + ic.stop)
        seen[inner_r.start:inner_r.stop, inner_c.start:inner_c.stop] += 1
        assert inner_r.start - wr.start in (0, Z_HALO) and wr.stop - inner_r.stop in (0, Z_HALO, rows - inner_r.stop)
    assert (seen == 1).all()
    assert _windows(rows, cols, 0) == [(slice(0, rows), slice(0, cols), slice(0, rows), slice(0, cols))]


def test_tiled_refinement_bounds_memory_and_still_improves(crop):
    tiled = GainHyperpriorCodec(device="cpu", tile=64)     # 160 x 183 px: 3 x 3 windows of 64 px
    p = tiled.prepare(crop)
    v = 3.0
    q = tiled.refine(p, crop, v, STEPS)
    changed = (q.y - p.y).abs().amax(dim=1)[0] > 1e-6     # every window's inner part was optimised
    assert changed[:4].any() and changed[-4:].any() and changed[:, :4].any() and changed[:, -4:].any()
    assert _objective(tiled, q, crop, v) < _objective(tiled, p, crop, v)
    payload = tiled.encode(q, v)
    assert np.array_equal(tiled.decode(payload, crop.shape[1], crop.shape[0], v), tiled.reconstruct(q, v))


def test_sga_anneals_to_rounding_and_straight_through_rounds():
    u = torch.tensor([0.1, 0.45, 0.55, 0.9, -1.3, 2.5001])
    g = torch.Generator().manual_seed(0)
    soft = sga_round(u, 0.5, g)
    assert ((soft >= u.floor()) & (soft <= u.floor() + 1)).all()
    cold = sga_round(u, 1e-4, g)
    assert torch.allclose(cold, torch.round(u), atol=1e-3)
    x = u.clone().requires_grad_(True)
    out = sga_round(x, 0.0)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.round(u)) and torch.equal(x.grad, torch.ones_like(u))


def test_lambda_follows_the_levels_and_extends_past_them(codec):
    lams = codec.model.config.lambdas
    assert lambda_at(codec.model, 0.0) == pytest.approx(lams[0])
    assert lambda_at(codec.model, 2.5) == pytest.approx((lams[2] * lams[3]) ** 0.5)
    assert lambda_at(codec.model, -1.0) < lams[0] and lambda_at(codec.model, len(lams)) > lams[-1]


def test_spec_and_worker_check_refinement(tmp_path, samples_dir):
    for bad in (-1, 1.5, True, 10 ** 6):
        with pytest.raises(SpecError, match="refine_steps"):
            JobSpec(input=str(samples_dir), output=str(tmp_path), target_bpp=0.5, refine_steps=bad)
    with pytest.raises(SpecError, match="budget"):
        JobSpec(input=str(samples_dir), output=str(tmp_path), budget_bpp=0.5, refine_steps=5)
    plain = JobSpec(input=str(samples_dir), output=str(tmp_path), target_bpp=0.5)
    assert JobSpec(input=str(samples_dir), output=str(tmp_path), target_bpp=0.5, refine_steps=5).spec_hash() \
        != plain.spec_hash()
    assert JobSpec(input=str(samples_dir), output=str(tmp_path), target_bpp=0.5, refine_steps=0).spec_hash() \
        == plain.spec_hash()
    for name in ("webp", "gain-hyperprior-roi"):
        with pytest.raises(CodecError, match="refine"):
            Compressor(CompressConfig(output=str(tmp_path), codec=name, refine_steps=5))


@pytest.mark.usefixtures("ray_session")
def test_compress_job_with_refinement_writes_refined_rows_that_decompress(tmp_path, samples_dir):
    from ratefit.jobs import decompress, recompress

    src = tmp_path / "in"
    src.mkdir()
    for name in ("coffee.png", "chelsea.png"):
        # without chelsea's 3 kB sRGB profile, which 0.5 bpp of a 160x128 crop has no room for
        Image.open(samples_dir / name).convert("RGB").crop((0, 0, 160, 128)).save(src / name, icc_profile=None)
    out = tmp_path / "out"
    summary = recompress.run(JobSpec(input=str(src), output=str(out), target_bpp=0.5, refine_steps=10,
                                     codec_options={"device": "cpu"}, verify=True))
    assert summary["statuses"] == {"ok": 2}
    rows = ds.dataset(str(out / "_manifest"), format="parquet").to_table().to_pylist()
    for r in rows:
        assert r["status"] == "ok" and r["verified"] and r["refine_steps"] == 10 and r["refine_ms"] > 0
        assert r["bpp"] <= 0.5 and r["bpp"] >= 0.49
    back = tmp_path / "back"
    decompress.run(JobSpec(input=str(out), output=str(back), kind="decompress"))
    assert len(list(back.rglob("*.png"))) == 2
