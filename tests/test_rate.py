"""Rate control: targets, the discrete search on real Pillow codecs, the continuous search
on a synthetic codec with a biased rate model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ratefit.jobs
from ratefit.codecs import get_codec
from ratefit.codecs.base import ControlRange
from ratefit.codecs.container import header_size
from ratefit.codecs.metrics import psnr
from ratefit.codecs.rate import Target, search

SAMPLE = Path(ratefit.jobs.__file__).parent / "samples" / "chelsea.png"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    with Image.open(SAMPLE) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    assert arr.ndim == 3 and arr.shape[2] == 3
    return np.ascontiguousarray(arr)


@pytest.fixture(scope="module", params=["jpeg", "webp"])
def codec(request):
    return get_codec(request.param)


def _overhead(codec) -> int:
    return header_size(codec.name, codec.weights_sha256, "RGB")


def _pixels(image: np.ndarray) -> int:
    return image.shape[0] * image.shape[1]


# ---------------------------------------------------------------------------- Target

@pytest.mark.parametrize("kind", ["bpp", "bytes", "psnr"])
@pytest.mark.parametrize("value", [1, 0.5, 1e-6, 1e9])
def test_target_accepts_positive_finite_values(kind, value):
    assert Target(kind, value).value == value


@pytest.mark.parametrize("kind,value", [
    ("bitrate", 1.0), ("BPP", 1.0), ("", 1.0), ("ssim", 0.9),
])
def test_target_rejects_bad_kind(kind, value):
    with pytest.raises(ValueError, match="target kind must be one of"):
        Target(kind, value)


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, "1.0", None])
def test_target_rejects_bad_values(value):
    with pytest.raises(ValueError, match="positive finite number"):
        Target("bpp", value)


@pytest.mark.parametrize("value", [np.int64(20000), np.float32(0.5)])
def test_target_accepts_numpy_scalars(value):
    assert Target("bytes", value).value == value


def test_max_bytes_bpp_is_floored():
    assert Target("bpp", 1.0).max_bytes(100) == 12          # 12.5 -> 12
    assert Target("bpp", 0.5).max_bytes(451 * 300) == 8456   # 8456.25
    assert Target("bpp", 8.0).max_bytes(10) == 10


def test_max_bytes_bytes_is_floored_and_ignores_pixels():
    assert Target("bytes", 1000).max_bytes(1) == 1000
    assert Target("bytes", 1000.9).max_bytes(10**8) == 1000


def test_max_bytes_psnr_is_none():
    assert Target("psnr", 40).max_bytes(100) is None


# ------------------------------------------------------------- discrete, real codecs

RATE_TARGETS = [Target("bpp", 0.3), Target("bpp", 1.0), Target("bytes", 20000)]


@pytest.mark.parametrize("target", RATE_TARGETS, ids=lambda t: f"{t.kind}{t.value:g}")
def test_discrete_rate_target_is_a_ceiling_met_as_closely_as_possible(codec, photo, target):
    prepared = codec.prepare(photo)
    overhead = _overhead(codec)
    ceiling = target.max_bytes(_pixels(photo))
    out = search(codec, prepared, photo, target, overhead)

    assert out.status == "ok" and out.reason is None
    assert out.value == int(out.value) and 0 <= out.value < 100
    assert len(out.payload) + overhead <= ceiling
    # the payload is the codec's encode at that value
    assert out.payload == codec.encode(prepared, out.value)
    # "as close below as the codec allows": one quality step up would break the ceiling
    assert len(codec.encode(prepared, out.value + 1)) + overhead > ceiling
    # and the search did not encode every quality
    assert 1 <= out.encodes <= 12


def test_discrete_search_result_decodes(codec, photo):
    out = search(codec, codec.prepare(photo), photo, Target("bpp", 1.0), _overhead(codec))
    h, w = photo.shape[:2]
    rec = codec.decode(out.payload, w, h, out.value)
    assert rec.shape == photo.shape and rec.dtype == np.uint8
    assert 25.0 < psnr(photo, rec) < 60.0


def test_discrete_tiny_target_leaves_no_room(codec, photo):
    # 0.001 bpp is 16 bytes for this photo: less than the container header alone
    target = Target("bpp", 0.001)
    out = search(codec, codec.prepare(photo), photo, target, _overhead(codec))
    assert out.status == "unreachable"
    assert out.value == 0.0
    assert out.payload == codec.encode(codec.prepare(photo), 0)
    assert out.reason and "no room" in out.reason


def test_discrete_target_below_the_lowest_quality(codec, photo):
    # 0.01 bpp leaves a little room for a payload, but quality 0 is still bigger
    target = Target("bpp", 0.01)
    overhead = _overhead(codec)
    budget = target.max_bytes(_pixels(photo)) - overhead
    assert budget > 0
    out = search(codec, codec.prepare(photo), photo, target, overhead)
    assert out.status == "unreachable"
    assert out.value == 0.0
    assert len(out.payload) > budget
    assert out.reason and "lowest" in out.reason and str(budget) in out.reason


def test_discrete_huge_target_is_unreachable_at_quality_100(codec, photo):
    target = Target("bpp", 50)
    overhead = _overhead(codec)
    out = search(codec, codec.prepare(photo), photo, target, overhead)
    assert out.status == "unreachable"
    assert out.value == 100.0
    assert len(out.payload) + overhead <= target.max_bytes(_pixels(photo))
    assert out.reason and "highest" in out.reason


@pytest.mark.parametrize("db", [30.0, 35.0])
def test_discrete_psnr_target_gives_the_smallest_quality_reaching_it(codec, photo, db):
    prepared = codec.prepare(photo)
    h, w = photo.shape[:2]
    out = search(codec, prepared, photo, Target("psnr", db), _overhead(codec))
    assert out.status == "ok" and out.reason is None
    v = int(out.value)
    assert psnr(photo, codec.decode(out.payload, w, h, v)) >= db
    assert v > 0
    below = codec.encode(prepared, v - 1)
    assert psnr(photo, codec.decode(below, w, h, v - 1)) < db


def test_discrete_unreachable_psnr():
    codec = get_codec("jpeg")
    with Image.open(SAMPLE) as im:
        photo = np.asarray(im.convert("RGB"))
    out = search(codec, codec.prepare(photo), photo, Target("psnr", 99), _overhead(codec))
    assert out.status == "unreachable"
    assert out.value == 100.0
    assert out.reason and "99" in out.reason and "dB" in out.reason


def test_discrete_psnr_reached_at_the_lowest_quality(codec, photo):
    out = search(codec, codec.prepare(photo), photo, Target("psnr", 1.0), _overhead(codec))
    assert out.status == "ok"
    assert out.value == 0.0


class SteppedCodec:
    """A discrete codec whose control is a quantiser step: larger step = fewer bits."""

    name = "stepped"
    extension = "stp.rfic"
    weights_sha256 = b""
    device = "cpu"
    speed = "fast"
    control = ControlRange("step", 1, 64, increasing=False, discrete=True)

    def __init__(self):
        self.calls = 0

    def prepare(self, image):
        return image

    def estimate(self, prepared, value):
        return None

    def encode(self, prepared, value):
        self.calls += 1
        assert value == int(value) and 1 <= value <= 64
        return bytes(int(100_000 / value))

    def decode(self, payload, width, height, value):
        return np.zeros((height, width, 3), np.uint8)


@pytest.mark.parametrize("nbytes", [3000, 5000, 10_000, 77_777])
def test_discrete_decreasing_control(nbytes):
    codec = SteppedCodec()
    image = np.zeros((16, 16, 3), np.uint8)
    out = search(codec, image, image, Target("bytes", nbytes), 0)
    assert out.status == "ok"
    assert len(out.payload) <= nbytes
    assert int(100_000 / (out.value - 1)) > nbytes   # one step finer breaks the ceiling
    assert out.encodes == codec.calls


def test_discrete_decreasing_control_unreachable_ends():
    codec = SteppedCodec()
    image = np.zeros((16, 16, 3), np.uint8)
    low = search(codec, image, image, Target("bytes", 100), 0)
    assert (low.status, low.value) == ("unreachable", 64.0)
    high = search(codec, image, image, Target("bytes", 10**7), 0)
    assert (high.status, high.value) == ("unreachable", 1.0)


# --------------------------------------------------------------------- continuous

class SmoothCodec:
    """A continuous codec: payload size grows smoothly with the rate position t in [0, 1]
    (200 * e^(5t) bytes), the rate model is off by ``bias`` (None: no model), and the
    decoded image's error shrinks with t."""

    name = "smooth"
    extension = "smooth.rfic"
    weights_sha256 = b""
    device = "cpu"
    speed = "fast"

    def __init__(self, bias: float | None = 0.9, increasing: bool = True, low: float = 0.0, high: float = 1.0):
        self.control = ControlRange("q", low, high, increasing=increasing, discrete=False)
        self.bias = bias
        self.encode_calls = 0
        self._ref = None
        self._noise = None

    def _t(self, value: float) -> float:
        c = self.control
        t = (value - c.low) / (c.high - c.low)
        return t if c.increasing else 1.0 - t

    def size(self, value: float) -> int:
        return int(200 * math.exp(5 * self._t(value)))

    def prepare(self, image):
        self._ref = image
        self._noise = np.random.default_rng(1234).standard_normal(image.shape)
        return image

    def estimate(self, prepared, value):
        if self.bias is None:
            return None
        return self.bias * 8.0 * 200 * math.exp(5 * self._t(value))

    def encode(self, prepared, value):
        c = self.control
        assert c.low <= value <= c.high
        self.encode_calls += 1
        return bytes(self.size(value))

    def decode(self, payload, width, height, value):
        sigma = 60.0 * math.exp(-3.4 * self._t(value))
        rec = np.rint(self._ref.astype(np.float64) + sigma * self._noise)
        return np.clip(rec, 0, 255).astype(np.uint8)


IMG = np.full((48, 48, 3), 128, np.uint8)      # 2304 px
SMOOTH_OVERHEAD = header_size("smooth")


def _run(codec: SmoothCodec, target: Target):
    return search(codec, codec.prepare(IMG), IMG, target, SMOOTH_OVERHEAD)


CONT_RATE_TARGETS = [Target("bpp", 2.0), Target("bpp", 8.0), Target("bpp", 40.0), Target("bytes", 5000)]
_ids = [f"{t.kind}{t.value:g}" for t in CONT_RATE_TARGETS]


@pytest.mark.parametrize("target", CONT_RATE_TARGETS, ids=_ids)
@pytest.mark.parametrize("bias", [0.9, 0.5, None], ids=["est0.9", "est0.5", "no-est"])
@pytest.mark.parametrize("increasing", [True, False], ids=["inc", "dec"])
def test_continuous_rate_lands_just_below_the_ceiling(target, bias, increasing):
    codec = SmoothCodec(bias=bias, increasing=increasing)
    ceiling = target.max_bytes(IMG.shape[0] * IMG.shape[1])
    out = _run(codec, target)
    total = len(out.payload) + SMOOTH_OVERHEAD
    assert out.status == "ok", out.reason
    assert total <= ceiling
    assert total >= 0.99 * ceiling
    assert codec.control.low < out.value < codec.control.high
    assert out.encodes == codec.encode_calls
    assert out.payload == codec.encode(None, out.value)
    if bias is not None:
        assert out.encodes <= 6
        assert out.estimates > 0
    else:
        assert out.estimates == 0


def test_continuous_rate_with_an_offset_decreasing_range():
    codec = SmoothCodec(bias=0.8, increasing=False, low=2.0, high=7.0)
    target = Target("bpp", 8.0)
    ceiling = target.max_bytes(IMG.shape[0] * IMG.shape[1])
    out = _run(codec, target)
    total = len(out.payload) + SMOOTH_OVERHEAD
    assert out.status == "ok"
    assert 0.99 * ceiling <= total <= ceiling
    assert 2.0 < out.value < 7.0


@pytest.mark.parametrize("target", [Target("bpp", 8.0), Target("bpp", 40.0)], ids=["bpp8", "bpp40"])
def test_continuous_rate_with_an_over_estimating_model_still_lands_close(target):
    codec = SmoothCodec(bias=1.25)
    ceiling = target.max_bytes(IMG.shape[0] * IMG.shape[1])
    out = _run(codec, target)
    total = len(out.payload) + SMOOTH_OVERHEAD
    assert out.status == "ok"
    assert total <= ceiling
    assert total >= 0.99 * ceiling


def _lowest_rate(c) -> float:
    return c.low if c.increasing else c.high


def _highest_rate(c) -> float:
    return c.high if c.increasing else c.low


@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("bias", [0.9, None])
def test_continuous_rate_unreachable_ends(increasing, bias):
    codec = SmoothCodec(bias=bias, increasing=increasing)
    c = codec.control
    # no room at all after the header
    out = _run(codec, Target("bytes", SMOOTH_OVERHEAD))
    assert out.status == "unreachable" and out.reason
    assert out.value == _lowest_rate(c)
    # room, but less than the lowest rate's 200 bytes
    out = _run(codec, Target("bytes", SMOOTH_OVERHEAD + 150))
    assert out.status == "unreachable" and "lowest" in out.reason
    assert out.value == _lowest_rate(c)
    assert len(out.payload) == 200
    # more than the highest rate can use
    out = _run(codec, Target("bytes", 10**6))
    assert out.status == "unreachable" and "highest" in out.reason
    assert out.value == _highest_rate(c)
    assert len(out.payload) == codec.size(_highest_rate(c))


@pytest.mark.parametrize("db", [20.0, 30.0, 38.0])
@pytest.mark.parametrize("increasing", [True, False], ids=["inc", "dec"])
def test_continuous_psnr_lands_just_above_the_target(db, increasing):
    codec = SmoothCodec(increasing=increasing)
    out = _run(codec, Target("psnr", db))
    assert out.status == "ok" and out.reason is None
    got = psnr(IMG, codec.decode(out.payload, 48, 48, out.value))
    assert db <= got <= db + 0.1
    assert codec.control.low < out.value < codec.control.high


def test_continuous_psnr_unreachable():
    codec = SmoothCodec()
    out = _run(codec, Target("psnr", 80.0))
    assert out.status == "unreachable"
    assert out.value == _highest_rate(codec.control)
    assert out.reason and "80" in out.reason


def test_continuous_psnr_met_at_the_lowest_rate():
    codec = SmoothCodec(increasing=False)
    out = _run(codec, Target("psnr", 5.0))
    assert out.status == "ok"
    assert out.value == _lowest_rate(codec.control)


def test_a_flat_stretch_whose_rates_differ_by_ulps_bisects_instead_of_dividing_by_zero():
    from ratefit.codecs.rate import _solve_below

    # Rates a few ulps apart over most of the range (a saturated learned model), then a step.
    def rate(u: float) -> float:
        return 2000.0 if u > 0.9 else 1000.0 * (1.0 + u * 1e-15)

    u, r = _solve_below(rate, 1500.0, 0.01)
    assert r <= 1500.0 and 0.85 < u <= 0.9
