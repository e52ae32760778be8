"""BD-rate arithmetic and the `ratefit eval` report on real photos."""

from __future__ import annotations

import json
import math
from argparse import Namespace

import numpy as np
from PIL import Image
import pytest

from ratefit.codecs.bdrate import bd_rate
from ratefit.jobs.tools import evaluate

RATES = [0.2, 0.4, 0.7, 1.1, 1.6]
PSNRS = [28.0, 30.5, 32.6, 34.5, 36.2]


def test_bd_rate_of_a_curve_against_itself_is_zero_and_scaled_rates_show_up():
    assert bd_rate(RATES, PSNRS, RATES, PSNRS) == pytest.approx(0.0, abs=1e-12)
    assert bd_rate(RATES, PSNRS, [r * 0.8 for r in RATES], PSNRS) == pytest.approx(-0.2, abs=1e-9)
    assert bd_rate(RATES, PSNRS, [r * 1.5 for r in RATES], PSNRS) == pytest.approx(0.5, abs=1e-9)
    # Point order does not matter; curves that do not overlap in quality have no BD-rate.
    assert bd_rate(RATES[::-1], PSNRS[::-1], RATES, PSNRS) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(bd_rate(RATES, PSNRS, RATES, [p + 20 for p in PSNRS]))
    with pytest.raises(ValueError, match="at least 4"):
        bd_rate(RATES[:3], PSNRS[:3], RATES, PSNRS)


def test_eval_writes_points_bd_rates_and_plot(samples_dir, tmp_path):
    out = tmp_path / "eval"
    args = Namespace(dir=str(samples_dir), codecs="webp,jpeg", codec_options=None, limit=2, workers=1,
                     values=["webp=10,30,50,70,90", "jpeg=10,30,50,70,90"], out=str(out))
    assert evaluate.run(args) == 0
    data = json.loads((out / "points.json").read_text())
    assert data["meta"]["images"] == 2 and len(data["per_image"]) == 2 * 2 * 5
    for name in ("webp", "jpeg"):
        pts = data["mean"][name]
        assert [p["value"] for p in pts] == [10, 30, 50, 70, 90]
        assert np.all(np.diff([p["bpp"] for p in pts]) > 0) and np.all(np.diff([p["psnr"] for p in pts]) > 0)
    table = json.loads((out / "bd_rate.json").read_text())
    assert table["webp"]["jpeg"] < 0 < table["jpeg"]["webp"]   # WebP beats JPEG on photos
    assert (out / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_adds_a_refined_curve_with_its_bd_rate_against_the_plain_one(samples_dir, tmp_path):
    out = tmp_path / "eval"
    crops = tmp_path / "crops"
    crops.mkdir()
    for name in ("astronaut.png", "coffee.png"):   # small crops keep refinement on the CPU short
        Image.open(samples_dir / name).convert("RGB").crop((64, 64, 192, 192)).save(crops / name)
    args = Namespace(dir=str(crops), codecs="gain-hyperprior", codec_options=["gain-hyperprior={\"device\": \"cpu\"}"],
                     limit=0, workers=1, values=["gain-hyperprior=0.5,2,3.5,5"], out=str(out), refine_steps=12)
    assert evaluate.run(args) == 0
    data = json.loads((out / "points.json").read_text())
    assert set(data["mean"]) == {"gain-hyperprior", "gain-hyperprior+refine12"} and data["meta"]["refine_steps"] == 12
    table = json.loads((out / "bd_rate.json").read_text())
    assert table["gain-hyperprior+refine12"]["gain-hyperprior"] < 0    # refinement saves bits at equal PSNR
