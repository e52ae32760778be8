"""Archive fidelity, end to end: what a photo owner cares about survives compress → decompress.

EXIF (with its sub-IFDs), XMP and a non-sRGB ICC profile travel with the default learned codec
(container sections) and with AVIF (embedded in a plain .avif file any viewer opens); alpha
survives exactly in the learned codec; a result that is not smaller than its input is never
kept (``skipped``) and never retires its original; JPEG XL's lossless JPEG transcode restores
every byte. Jobs run in process (``--in-process``): the shard code is the same as on Ray.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from ratefit.jobs import compress, decompress
from ratefit.jobs.spec import JobSpec

ARTIST, COPYRIGHT, TAKEN = 0x013B, 0x8298, 0x9003
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>A. Photographer</dc:creator>'
       b'</rdf:Description></rdf:RDF></x:xmpmeta>')


def _rows(out: Path) -> dict[str, dict]:
    table = ds.dataset(str(out / "_manifest"), format="parquet").to_table()
    return {Path(r["input_uri"]).name: r for r in table.to_pylist()}


def _exif_bytes() -> bytes:
    exif = Image.Exif()
    exif[ARTIST] = "A. Photographer"
    exif[COPYRIGHT] = "(c) 2026 A. Photographer"
    exif.get_ifd(EXIF_IFD)[TAKEN] = "2026:11:30 10:20:30"
    gps = exif.get_ifd(GPS_IFD)
    gps[1], gps[2], gps[3], gps[4] = "N", (52.0, 31.0, 12.0), "E", (13.0, 24.0, 36.0)
    return exif.tobytes()


def _tags(exif_source) -> dict:
    exif = exif_source.getexif() if isinstance(exif_source, Image.Image) else _load_exif(exif_source)
    return {"artist": exif.get(ARTIST), "copyright": exif.get(COPYRIGHT),
            "taken": exif.get_ifd(EXIF_IFD).get(TAKEN), "gps": dict(exif.get_ifd(GPS_IFD))}


def _load_exif(data: bytes) -> Image.Exif:
    exif = Image.Exif()
    exif.load(data)
    return exif


def _xmp_of(im: Image.Image) -> bytes | None:
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    return xmp.encode() if isinstance(xmp, str) else xmp


@pytest.fixture()
def tagged_jpegs(samples_dir, tmp_path, wide_gamut_icc) -> Path:
    """Two JPEGs carrying EXIF (artist, copyright, date taken, GPS), XMP and a non-sRGB profile."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        im = Image.open(samples_dir / name).convert("RGB").resize((256, 192))
        im.save(folder / f"{Path(name).stem}.jpg", quality=95, exif=_exif_bytes(), xmp=XMP,
                icc_profile=wide_gamut_icc)
    return folder


@pytest.mark.parametrize("codec,target", [("avif", 1.5), ("gain-hyperprior", 1.5)])
def test_metadata_and_profile_travel_and_are_restored(tagged_jpegs, tmp_path, codec, target, wide_gamut_icc):
    out, restored = tmp_path / "out", tmp_path / "restored"
    compress.run(JobSpec(input=str(tagged_jpegs), output=str(out), codec=codec, target_bpp=target,
                         verify=True, in_process=True))
    rows = _rows(out)
    original = Image.open(tagged_jpegs / "chelsea.jpg")
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        assert row["has_icc"] and row["exif_bytes"] > 0 and row["xmp_bytes"] > 0 and row["verified"]
        assert row["output_bytes"] < row["input_bytes"]
    if codec == "avif":   # a plain file: plain Pillow opens it and sees the same tags and profile
        stored = out / "chelsea.jpg.avif"
        assert stored.exists() and not stored.read_bytes().startswith(b"RFIC")
        with Image.open(stored) as im:
            assert im.format == "AVIF"
            assert _tags(im) == _tags(original)
            assert im.info.get("icc_profile") == wide_gamut_icc
            assert _xmp_of(im) == XMP
        assert rows["chelsea.jpg"]["output_sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    else:
        assert (out / "chelsea.jpg.ghp.rfic").read_bytes().startswith(b"RFIC")
    decompress.run(JobSpec(input=str(out), output=str(restored), kind="decompress", in_process=True))
    for name in ("chelsea", "coffee"):
        with Image.open(restored / f"{name}.jpg.png") as png, Image.open(tagged_jpegs / f"{name}.jpg") as src:
            assert _tags(png) == _tags(src)
            assert png.info.get("icc_profile") == src.info["icc_profile"] == wide_gamut_icc
            assert _xmp_of(png) == XMP


def test_strip_metadata_and_srgb(tagged_jpegs, tmp_path):
    stripped, srgb = tmp_path / "stripped", tmp_path / "srgb"
    compress.run(JobSpec(input=str(tagged_jpegs), output=str(stripped), codec="avif", target_bpp=1.5,
                         strip_metadata=True, in_process=True))
    compress.run(JobSpec(input=str(tagged_jpegs), output=str(srgb), codec="avif", target_bpp=1.5,
                         srgb=True, in_process=True))
    row = _rows(stripped)["chelsea.jpg"]
    assert (row["has_icc"], row["exif_bytes"], row["xmp_bytes"]) == (False, 0, 0)
    with Image.open(stripped / "chelsea.jpg.avif") as im:
        assert "icc_profile" not in im.info or not im.info["icc_profile"]
        assert not im.getexif().get(ARTIST) and not _xmp_of(im)
    row = _rows(srgb)["chelsea.jpg"]
    assert (row["has_icc"], row["exif_bytes"] > 0, row["xmp_bytes"] > 0) == (False, True, True)
    with Image.open(srgb / "chelsea.jpg.avif") as im:
        assert im.getexif().get(ARTIST) == "A. Photographer"


@pytest.fixture()
def rgba_pngs(samples_dir, tmp_path) -> Path:
    folder = tmp_path / "rgba"
    folder.mkdir()
    for i, name in enumerate(("chelsea.png", "astronaut.png")):
        rgb = np.asarray(Image.open(samples_dir / name).convert("RGB").resize((192, 128)))
        yy, xx = np.indices(rgb.shape[:2])
        alpha = np.where(((xx - 96) ** 2 + (yy - 64) ** 2) < 50 ** 2, 255, (xx * 2 + i * 40) % 256).astype(np.uint8)
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / f"{Path(name).stem}.png")
    return folder


def test_learned_codec_keeps_alpha_exactly_and_retiring_loses_nothing(rgba_pngs, tmp_path):
    alphas = {p.name: np.asarray(Image.open(p))[..., 3].copy() for p in rgba_pngs.glob("*.png")}
    out, restored = tmp_path / "out", tmp_path / "restored"
    summary = compress.run(JobSpec(input=str(rgba_pngs), output=str(out), target_bpp=1.0,
                                   retire_originals=True, in_process=True))
    assert summary["retired_items"] == 2 and not list(rgba_pngs.glob("*.png"))   # the originals are gone
    for row in _rows(out).values():
        assert row["status"] == "ok" and row["has_alpha"] and not row["alpha_dropped"] and row["verified"]
        assert row["bpp"] <= 1.0   # the alpha plane counts in the target
    decompress.run(JobSpec(input=str(out), output=str(restored), kind="decompress", in_process=True))
    for name, alpha in alphas.items():
        with Image.open(restored / name) as im:
            assert im.mode == "RGBA"
            assert np.array_equal(np.asarray(im)[..., 3], alpha)


def test_jpeg_drops_alpha_and_says_so(rgba_pngs, tmp_path):
    out = tmp_path / "out"
    compress.run(JobSpec(input=str(rgba_pngs), output=str(out), codec="jpeg", target_bpp=2.0, in_process=True))
    row = _rows(out)["chelsea.png"]
    assert row["status"] == "ok" and row["has_alpha"] and row["alpha_dropped"]
    with Image.open(out / "chelsea.png.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB"


def test_webp_keeps_alpha_in_a_plain_file(rgba_pngs, tmp_path):
    out, restored = tmp_path / "out", tmp_path / "restored"
    compress.run(JobSpec(input=str(rgba_pngs), output=str(out), codec="webp", target_bpp=3.0, verify=True,
                         in_process=True))
    row = _rows(out)["chelsea.png"]
    assert row["status"] == "ok" and row["has_alpha"] and not row["alpha_dropped"]
    decompress.run(JobSpec(input=str(out), output=str(restored), kind="decompress", in_process=True))
    with Image.open(rgba_pngs / "chelsea.png") as src, Image.open(restored / "chelsea.png") as back:
        assert back.mode == "RGBA"
        assert np.array_equal(np.asarray(back)[..., 3], np.asarray(src)[..., 3])   # WebP codes alpha losslessly


# ------------------------------------------------------------------------ never larger

@pytest.fixture()
def tiny_jpeg(tmp_path, samples_dir) -> Path:
    """A tiny, already well-compressed JPEG and a photo PNG, listed with their own targets:
    the JPEG's is generous (its result cannot be smaller), the PNG's one it meets."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / "tiny.jpg", quality=30)
    Image.open(samples_dir / "chelsea.png").convert("RGB").resize((96, 64)).save(folder / "photo.png")
    (folder / "listing.csv").write_text("uri,target_bpp\ntiny.jpg,24\nphoto.png,8\n")
    return folder


@pytest.mark.parametrize("retire", [False, True])
def test_a_result_not_smaller_is_skipped_and_never_retired(tiny_jpeg, tmp_path, retire):
    out = tmp_path / "out"
    size = (tiny_jpeg / "tiny.jpg").stat().st_size
    summary = compress.run(JobSpec(input=str(tiny_jpeg / "listing.csv"), output=str(out), codec="jpeg",
                                   retire_originals=retire, in_process=True))
    rows = _rows(out)
    tiny = rows["tiny.jpg"]
    assert tiny["status"] == "skipped" and tiny["output_uri"] is None
    assert tiny["candidate_bytes"] >= size and f"{size:,} B input" in tiny["error"]
    assert not (out / "tiny.jpg.jpg").exists()
    assert (tiny_jpeg / "tiny.jpg").exists()                    # kept, even with --retire-originals
    assert summary["skipped_items"] == 1 and summary["skipped_candidate_bytes"] == tiny["candidate_bytes"]
    photo = rows["photo.png"]
    assert photo["status"] == "ok" and photo["output_bytes"] < photo["input_bytes"]
    assert (tiny_jpeg / "photo.png").exists() != retire         # an ok row's original is retired


def test_min_savings_raises_the_bar(tiny_jpeg, tmp_path):
    out = tmp_path / "out"
    compress.run(JobSpec(input=str(tiny_jpeg / "listing.csv"), output=str(out), codec="jpeg", min_savings=0.999,
                         in_process=True))
    photo = _rows(out)["photo.png"]
    assert photo["status"] == "skipped" and "--min-savings 0.999" in photo["error"]


# ------------------------------------------------------------------------ JPEG XL

@pytest.fixture()
def jpegs(samples_dir, tmp_path) -> Path:
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        im = Image.open(samples_dir / name).convert("RGB")
        im.save(folder / f"{Path(name).stem}.jpg", quality=90, exif=_exif_bytes())
    (folder / "rocket.jpg").write_bytes((samples_dir / "rocket.jpg").read_bytes())
    return folder


def test_jxl_lossless_restores_every_jpeg_byte_for_byte(jpegs, tmp_path):
    before = {p.name: p.read_bytes() for p in jpegs.glob("*.jpg")}
    out, restored = tmp_path / "out", tmp_path / "restored"
    summary = compress.run(JobSpec(input=str(jpegs), output=str(out), codec="jxl-lossless",
                                   retire_originals=True, in_process=True))
    assert summary["retired_items"] == 3
    for name, row in _rows(out).items():
        assert row["status"] == "ok" and row["exact_original"] and row["verified"] and row["psnr"] == float("inf")
        assert row["output_bytes"] < row["input_bytes"]
        assert row["input_sha256"] == hashlib.sha256(before[name]).hexdigest()
    decompress.run(JobSpec(input=str(out), output=str(restored), kind="decompress", in_process=True))
    for name, data in before.items():
        assert (restored / name).read_bytes() == data                   # a/b.jpg.jxl → a/b.jpg, the same bytes


def test_jxl_lossless_refuses_rate_targets(jpegs, tmp_path):
    from ratefit.jobs.spec import SpecError

    with pytest.raises(SpecError, match="lossless"):
        JobSpec(input=str(jpegs), output=str(tmp_path / "o"), codec="jxl-lossless", target_bpp=1.0)
    with pytest.raises(SpecError, match="lossless"):
        JobSpec(input=str(jpegs), output=str(tmp_path / "o"), codec="jxl-lossless", budget_bpp=1.0)


def test_plain_output_changed_after_compress_is_caught_by_its_checksum(tagged_jpegs, tmp_path):
    out, restored = tmp_path / "out", tmp_path / "restored"
    compress.run(JobSpec(input=str(tagged_jpegs), output=str(out), codec="webp", target_bpp=1.5, in_process=True))
    damaged = out / "chelsea.jpg.webp"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    decompress.run(JobSpec(input=str(out), output=str(restored), kind="decompress", in_process=True))
    table = ds.dataset(str(restored / "_manifest"), format="parquet").to_table().to_pylist()
    by_name = {Path(r["input_uri"]).name: r for r in table}
    assert by_name["chelsea.jpg.webp"]["status"] == "error" and "checksum" in by_name["chelsea.jpg.webp"]["error"]
    assert by_name["coffee.jpg.webp"]["status"] == "ok"
    with Image.open(restored / "coffee.jpg.png") as im:
        assert im.size == (256, 192)


def test_old_rfic_outputs_of_classical_codecs_still_decode(samples_dir, tmp_path):
    """Before plain files, a JPEG/WebP/AVIF result was wrapped in an RFIC container."""
    import io as _io

    from ratefit.codecs import container

    folder, restored = tmp_path / "old", tmp_path / "restored"
    folder.mkdir()
    im = Image.open(samples_dir / "chelsea.png").convert("RGB")
    buf = _io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    (folder / "chelsea.png.jpg.rfic").write_bytes(container.pack("jpeg", buf.getvalue(), value=80, width=im.width,
                                                                 height=im.height))
    summary = decompress.run(JobSpec(input=str(folder), output=str(restored), kind="decompress", in_process=True))
    assert summary["statuses"] == {"ok": 1}
    with Image.open(restored / "chelsea.png") as back:
        assert back.size == im.size
