"""Quality metrics: PSNR and MS-SSIM on uint8 RGB."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ratefit.codecs.metrics import MS_SSIM_MIN_SIDE, ms_ssim, mse, psnr


def _smooth(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    r = 128 + 100 * np.sin(x / 9.0) * np.cos(y / 13.0)
    g = 128 + 90 * np.cos((x + y) / 17.0)
    b = (x * 255 // max(w - 1, 1))
    return np.clip(np.stack([r, g, b], axis=2), 0, 255).astype(np.uint8)


def _noisy(a: np.ndarray, amp: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-amp, amp + 1, a.shape)
    return np.clip(a.astype(np.int64) + noise, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------- PSNR

def test_psnr_identical_is_inf():
    a = _smooth(20, 30)
    assert psnr(a, a.copy()) == math.inf


def test_psnr_constant_error_of_one():
    a = np.full((10, 12, 3), 100, np.uint8)
    b = a + 1
    assert mse(a, b) == 1.0
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2), abs=1e-9)
    assert psnr(a, b) == pytest.approx(48.13, abs=0.005)


def test_psnr_error_sign_does_not_matter_and_uint8_does_not_wrap():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 255, np.uint8)
    # a - b would wrap to 1 in uint8 arithmetic; the true error is 255 -> 0 dB
    assert psnr(a, b) == pytest.approx(0.0, abs=1e-12)
    assert psnr(b, a) == psnr(a, b)


def test_psnr_known_mse():
    a = np.full((8, 8, 3), 50, np.uint8)
    b = a.copy()
    b[..., 0] += 3           # one third of the samples off by 3 -> mse 3
    assert mse(a, b) == pytest.approx(3.0)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 3.0))


def test_psnr_decreases_with_more_noise():
    a = _smooth(40, 40)
    assert psnr(a, _noisy(a, 2)) > psnr(a, _noisy(a, 10)) > psnr(a, _noisy(a, 40))


@pytest.mark.parametrize("fn", [psnr, mse, ms_ssim])
def test_shape_mismatch_raises(fn):
    a = np.zeros((200, 200, 3), np.uint8)
    with pytest.raises(ValueError, match="shape mismatch"):
        fn(a, np.zeros((200, 201, 3), np.uint8))
    with pytest.raises(ValueError, match="shape mismatch"):
        fn(a, np.zeros((200, 200), np.uint8))


# ---------------------------------------------------------------------------- MS-SSIM

@pytest.fixture(scope="module")
def big() -> np.ndarray:
    return _smooth(MS_SSIM_MIN_SIDE + 20, MS_SSIM_MIN_SIDE + 40)


def test_ms_ssim_identical_is_one(big):
    assert ms_ssim(big, big.copy()) == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_noisy_is_below_one_and_ordered(big):
    light = ms_ssim(big, _noisy(big, 5))
    heavy = ms_ssim(big, _noisy(big, 60))
    assert isinstance(light, float)
    assert 0.0 < heavy < light < 1.0
    assert light < 0.9999


def test_ms_ssim_at_the_minimum_side_is_a_number():
    a = _smooth(MS_SSIM_MIN_SIDE, MS_SSIM_MIN_SIDE)
    v = ms_ssim(a, _noisy(a, 10))
    assert v is not None and 0.0 < v < 1.0


@pytest.mark.parametrize("shape", [(160, 400, 3), (400, 160, 3), (1, 1, 3), (16, 16, 3), (160, 160, 3)])
def test_ms_ssim_is_none_for_small_images(shape):
    a = np.zeros(shape, np.uint8)
    assert ms_ssim(a, a) is None


def test_ms_ssim_does_not_modify_inputs(big):
    a, b = big.copy(), _noisy(big, 10)
    a0, b0 = a.copy(), b.copy()
    ms_ssim(a, b)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)


def test_mse_in_row_chunks_equals_the_float_reference():
    from ratefit.codecs import metrics

    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (metrics._MSE_ROWS * 2 + 17, 33, 3), dtype=np.uint8)
    b = rng.integers(0, 256, a.shape, dtype=np.uint8)
    d = a.astype(np.float64) - b.astype(np.float64)
    assert metrics.mse(a, b) == pytest.approx(float(np.mean(d * d)), rel=1e-12)
    assert metrics.mse(np.zeros((3, 3, 3), np.uint8), np.full((3, 3, 3), 255, np.uint8)) == 255.0 ** 2
