"""Decoders that cannot be crashed: random, truncated and mutated bitstreams, forged sizes.

Every case must come back as a picture of the size the header claims or as the decoder's
own error (CodecError / ItemError), within a bounded time. Anything else (another
exception type, a hang past the deadline, a crash of the process) fails the test. The
payloads reach the codecs past the container's CRC (it is recomputed after mutating), so
the decoders themselves are exercised, not only the checksum. `ratefit fuzz` runs the same
cases for longer, each batch in a child process that is watched for crashes and hangs.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ratefit.codecs import container
from ratefit.codecs.base import CodecError
from ratefit.codecs.registry import get_codec
from ratefit.workers.decompress import decode_container
from ratefit.workers.read import ItemError

W, H = 96, 64
CASES = settings(max_examples=60, deadline=timedelta(seconds=20), derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _photo(w: int = W, h: int = H) -> np.ndarray:
    im = Image.open(io.BytesIO(_SAMPLE)).convert("RGB").resize((w, h))
    return np.asarray(im)


def _sample_bytes() -> bytes:
    import ratefit.jobs

    return (Path(ratefit.jobs.__file__).parent / "samples" / "chelsea.png").read_bytes()


_SAMPLE = _sample_bytes()


@pytest.fixture(scope="module")
def learned():
    return get_codec("gain-hyperprior", device="cpu")


@pytest.fixture(scope="module")
def payloads(learned):
    """A valid payload per codec, at a mid rate, for the mutation cases."""
    img = _photo()
    out = {}
    for name in ("jpeg", "webp", "avif"):
        codec = get_codec(name)
        out[name] = (codec, codec.encode(codec.prepare(img), 50))
    out["gain-hyperprior"] = (learned, learned.encode(learned.prepare(img), 3.0))
    return out


def _decode_or_codec_error(codec, payload: bytes, w: int = W, h: int = H, value: float = 3.0):
    try:
        pixels = codec.decode(payload, w, h, value)
    except CodecError:
        return None
    assert pixels.shape == (h, w, 3) and pixels.dtype == np.uint8
    return pixels


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None, extra: bytes) -> bytes:
    b = bytearray(data)
    for pos, bit in flips:
        if b:
            b[pos % len(b)] ^= 1 << (bit % 8)
    out = bytes(b)
    if cut is not None:
        out = out[:cut % (len(out) + 1)]
    return out + extra


MUTATIONS = dict(
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 7)), max_size=12),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    extra=st.binary(max_size=16),
)


@CASES
@given(data=st.binary(max_size=4096), zlen=st.integers(0, 5000),
       size=st.tuples(st.integers(1, 200), st.integers(1, 200)), value=st.floats(-1, 8))
def test_learned_decoder_on_random_payloads(learned, data, zlen, size, value):
    w, h = size
    _decode_or_codec_error(learned, struct.pack("<I", zlen) + data, w, h, value)


@CASES
@given(**MUTATIONS)
def test_learned_decoder_on_mutated_payloads(payloads, flips, cut, extra):
    codec, good = payloads["gain-hyperprior"]
    _decode_or_codec_error(codec, _mutate(good, flips, cut, extra))


@pytest.fixture(scope="module")
def roi_payload():
    """The spatial codec's payload for a center map: span + zlib'd grid + the streams."""
    from ratefit.codecs.qmap import center_map

    codec = get_codec("gain-hyperprior-roi", device="cpu")
    return codec, codec.encode(codec.prepare(_photo(), center_map(H, W)), 3.0)


@CASES
@given(**MUTATIONS)
def test_spatial_decoder_on_mutated_payloads(roi_payload, flips, cut, extra):
    codec, good = roi_payload
    _decode_or_codec_error(codec, _mutate(good, flips, cut, extra))


@CASES
@given(cells=st.binary(max_size=64), fill=st.integers(0, 255), drow=st.integers(-1, 1), dcol=st.integers(-1, 1),
       dlen=st.integers(-3, 3), span=st.floats(allow_nan=True, width=32), rest=st.binary(max_size=512))
def test_spatial_decoder_on_forged_map_headers(roi_payload, cells, fill, drow, dcol, dlen, span, rest):
    """Grids of the right shape or one off, any levels and lengths, any span, then junk streams."""
    from ratefit.codecs.qmap import grid_shape

    codec, _ = roi_payload
    rows, cols = grid_shape(H, W, 64)
    body = zlib.compress(cells.ljust(rows * cols, bytes([fill])) if drow == dcol == 0 else cells)
    forged = (struct.pack("<fHHH", span, rows + drow, cols + dcol, max(0, len(body) + dlen)) + body
              + struct.pack("<I", len(rest) // 2) + rest)
    _decode_or_codec_error(codec, forged)


def test_learned_decoder_on_adversarial_escape_runs(learned):
    """All-ones bytes make every symbol an escape with endless bypass counts: still bounded."""
    for zlen in (0, 4, 64):
        _decode_or_codec_error(learned, struct.pack("<I", zlen) + b"\xff" * 20000)
    _decode_or_codec_error(learned, b"")
    _decode_or_codec_error(learned, struct.pack("<I", 0))


@CASES
@given(name=st.sampled_from(["jpeg", "webp", "avif"]), data=st.binary(max_size=2048))
def test_classical_decoders_on_random_payloads(payloads, name, data):
    codec, good = payloads[name]
    _decode_or_codec_error(codec, good[:12] + data)   # a real signature, then noise
    _decode_or_codec_error(codec, data)


@CASES
@given(name=st.sampled_from(["jpeg", "webp", "avif"]), **MUTATIONS)
def test_classical_decoders_on_mutated_payloads(payloads, name, flips, cut, extra):
    codec, good = payloads[name]
    _decode_or_codec_error(codec, _mutate(good, flips, cut, extra))


def test_jpeg_payload_claiming_a_huge_size_is_refused_before_decoding(payloads, monkeypatch):
    # Workers turn Pillow's own bomb check off (read.py applies ratefit's limit instead);
    # the codec's size check must hold without it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    codec, good = payloads["jpeg"]
    sof = good.index(b"\xff\xc0") if b"\xff\xc0" in good else good.index(b"\xff\xc2")
    forged = bytearray(good)
    forged[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(CodecError, match="60000x60000"):
        codec.decode(bytes(forged), W, H, 50)


# ------------------------------------------------------------------------- QARV (untrained)

@pytest.fixture(scope="module")
def qarv():
    """A small random-initialised QARV and a valid payload: its decoder must hold on any weights."""
    from ratefit.codecs.qarv import QarvCodec, untrained_checkpoint

    codec = QarvCodec(untrained_checkpoint(), device="cpu")
    mid = (codec.control.low + codec.control.high) / 2
    return codec, codec.encode(codec.prepare(_photo()), mid), mid


def _qarv_framed(strings: list[bytes], kind: int = 0x02) -> bytes:
    """Strings framed as a well-formed payload (device byte, count, lengths), so rANS sees them."""
    return bytes([kind, len(strings)]) + b"".join(struct.pack("<I", len(x)) for x in strings) + b"".join(strings)


@CASES
@given(strings=st.lists(st.binary(max_size=600), max_size=8), size=st.tuples(st.integers(1, 200), st.integers(1, 200)))
def test_qarv_decoder_on_random_strings_of_any_count_and_size(qarv, strings, size):
    codec, _, mid = qarv
    _decode_or_codec_error(codec, _qarv_framed(strings), *size, mid)


@CASES
@given(flips=MUTATIONS["flips"], value=st.floats(-3, 4), groups=st.integers(0, 8))
def test_qarv_decoder_on_flipped_strings_at_any_lambda_and_depth(qarv, flips, value, groups):
    """Bit flips inside the strings only (the frame stays valid), decoded at any λ and group count."""
    from ratefit.codecs.qarv import unpack_strings

    codec, good, _ = qarv
    _, _, strings = unpack_strings(good)
    body = bytearray(b"".join(strings))
    for pos, bit in flips:
        body[pos % len(body)] ^= 1 << bit
    cut, pos = [], 0
    for x in strings:
        cut.append(bytes(body[pos:pos + len(x)]))
        pos += len(x)
    payload = _qarv_framed(cut)
    if groups > codec.model.num_latents:
        with pytest.raises(CodecError, match="progressive groups|is outside"):
            codec.decode_progressive(payload, W, H, value, groups)
        return
    try:
        pixels = codec.decode_progressive(payload, W, H, value, groups)
    except CodecError:
        return
    assert pixels.shape == (H, W, 3) and pixels.dtype == np.uint8


@CASES
@given(**MUTATIONS)
def test_qarv_decoder_on_mutated_payloads(qarv, flips, cut, extra):
    codec, good, mid = qarv
    _decode_or_codec_error(codec, _mutate(good, flips, cut, extra), value=mid)


# ------------------------------------------------------- the whole untrusted path (container)

def _reframed(blob: bytes, payload: bytes, **header) -> bytes:
    """A container around ``payload`` with a correct CRC, so the codec sees the damage."""
    h, _ = container.unpack(blob)
    fields = dict(value=h.value, width=h.width, height=h.height, mode=h.mode, weights_sha256=h.weights_sha256)
    fields.update(header)
    return container.pack(h.codec, payload, **fields)


def _decode_or_item_error(data: bytes, codecs: dict, max_pixels: int = 10_000_000):
    def codec_for(header):
        if header.codec not in codecs:
            raise ItemError("decode", f"unknown codec {header.codec!r}")
        return codecs[header.codec]

    try:
        header, pixels = decode_container(data, codec_for, max_pixels)
    except ItemError as e:
        assert e.stage == "decode" and e.message
        return None
    assert pixels.shape == (header.height, header.width, 3)
    return pixels


@CASES
@given(name=st.sampled_from(["jpeg", "webp", "avif", "gain-hyperprior"]),
       size=st.one_of(st.none(), st.tuples(st.integers(1, 300), st.integers(1, 300))),
       value=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)), **MUTATIONS)
def test_containers_with_valid_crc_and_damaged_payload_or_header(payloads, name, size, value, flips, cut, extra):
    codec, good = payloads[name]
    blob = container.pack(name, good, value=3.0 if name == "gain-hyperprior" else 50, width=W, height=H,
                          weights_sha256=codec.weights_sha256)
    header = {}
    if size is not None:
        header.update(width=size[0], height=size[1])
    if value is not None:
        header["value"] = value
    data = _reframed(blob, _mutate(good, flips, cut, extra), **header)
    _decode_or_item_error(data, {n: c for n, (c, _) in payloads.items()})


def test_container_claiming_a_huge_image_is_refused_before_decoding(payloads):
    codec, good = payloads["gain-hyperprior"]
    blob = container.pack("gain-hyperprior", good, value=3.0, width=60000, height=60000,
                          weights_sha256=codec.weights_sha256)
    with pytest.raises(ItemError, match="60000x60000 = 3600000000 pixels, over the limit"):
        decode_container(blob, lambda h: codec, max_pixels=100_000_000)


def test_crc_still_guards_the_payload(payloads):
    _, good = payloads["webp"]
    blob = bytearray(container.pack("webp", good, value=50, width=W, height=H))
    blob[-5] ^= 0x40
    assert _decode_or_item_error(bytes(blob), {"webp": payloads["webp"][0]}) is None
    assert zlib.crc32(good) == container.unpack(container.pack("webp", good, value=50, width=W, height=H))[0].crc32


# ------------------------------------------------------------------- the long-run harness

# Counted in cases, not seconds: a loaded machine runs the same cases, only later.

def test_fuzz_command_runs_cases_and_reports_none_failing(tmp_path):
    from ratefit.jobs.cli import main

    assert main(["fuzz", "--cases", "40", "--targets", "container,webp", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "fuzz-report.json").read_text())
    assert report["cases_per_target"] == 40 and report["seconds"] is None
    assert [t["target"] for t in report["targets"]] == ["container", "webp"]
    for t in report["targets"]:
        assert t["cases"] == 40 and t["decoded"] + t["rejected"] == t["cases"]
        assert not (t["unexpected"] or t["crashes"] or t["hangs"])


def test_fuzz_command_with_seconds_runs_at_least_one_case_per_target(tmp_path):
    """``--seconds`` alone (the long-run form) still works: each child gets at least a second
    after its set-up and checks the clock only after a case, so every target runs one."""
    from ratefit.jobs.cli import main

    assert main(["fuzz", "--seconds", "1", "--targets", "webp", "--out", str(tmp_path)]) == 0
    (t,) = json.loads((tmp_path / "fuzz-report.json").read_text())["targets"]
    assert t["cases"] >= 1 and t["decoded"] + t["rejected"] == t["cases"]
    assert main(["fuzz", "--cases", "0", "--out", str(tmp_path)]) == 2


def test_fuzz_harness_catches_a_crashing_case_saves_it_and_goes_on(tmp_path, monkeypatch):
    from ratefit.jobs.tools import fuzz

    monkeypatch.setenv("RATEFIT_FUZZ_CRASH_AT", "7")
    report = fuzz._run_target("jpeg", seed=3, seconds=None, case_timeout=30, out=tmp_path, cases=12)
    assert [c["case"] for c in report.crashes] == [7]
    assert report.crashes[0]["returncode"] < 0          # killed by a signal (SIGABRT), as a segfault would be
    saved = Path(report.crashes[0]["file"]).read_bytes()
    assert saved == fuzz.make_case(fuzz._seeds(("jpeg",)), "jpeg", 3, 7), "the saved case replays the crash"
    # Cases 0..7 were the crashed child's (its counts died with it); a fresh one ran 8..11.
    assert report.cases == 12 and report.decoded + report.rejected == 4, "a fresh child carried on after the crash"
    assert not (report.unexpected or report.hangs)
    json.dumps(report.__dict__)
