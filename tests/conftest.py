"""Shared fixtures: a real local Ray, a real S3 server on 127.0.0.1, and the photos.

Nothing here is mocked: Ray workers are separate processes, so only a real server can
reach them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import ratefit.jobs
from ratefit.cluster.connect import quiet_ray_environment

SAMPLES = Path(ratefit.jobs.__file__).parent / "samples"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KODAK = SHARED / "data" / "kodak"

quiet_ray_environment()


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def kodak_dir() -> Path:
    if not KODAK.is_dir() or not list(KODAK.glob("kodim*.png")):
        pytest.skip(f"Kodak photos not found at {KODAK}: these tests need ../shared/data/kodak "
                    "next to the repository (see ../shared/README.md)")
    return KODAK


@pytest.fixture(scope="session")
def wide_gamut_icc() -> bytes:
    """An RGB ICC profile that is not sRGB (its green primary moved), made from littleCMS's sRGB:
    the same pixel values mean other colours, so converting or dropping it shows."""
    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    for i in range(int.from_bytes(data[128:132], "big")):
        entry = 132 + 12 * i
        if bytes(data[entry:entry + 4]) == b"gXYZ":
            at = int.from_bytes(data[entry + 4:entry + 8], "big") + 8
            x = int.from_bytes(data[at:at + 4], "big", signed=True)
            data[at:at + 4] = int(x * 0.8).to_bytes(4, "big", signed=True)
    return bytes(data)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (jobs reuse it instead of starting their own)."""
    import ray

    from ratefit.cluster.connect import connect

    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from ratefit.cluster.s3server import S3Server

    server = S3Server(str(tmp_path_factory.mktemp("s3data"))).start()
    yield server
    server.stop()


@pytest.fixture()
def s3fs_client(s3_server):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)


@pytest.fixture()
def photo_dir(tmp_path, samples_dir) -> Path:
    """A small input tree: the sample photos, one in a folder with a space and non-ASCII name.

    chelsea.png is written without its 3 kB XMP packet and 3 kB sRGB profile (same pixels):
    metadata counts in a target, and these tests hold small images to small targets; what
    happens to metadata is tested in test_fidelity.py.
    """
    root = tmp_path / "in"
    (root / "sub dir" / "ünï").mkdir(parents=True)
    copy_without_metadata(samples_dir / "chelsea.png", root / "chelsea.png")
    shutil.copy(samples_dir / "rocket.jpg", root / "sub dir" / "rocket launch.jpg")
    shutil.copy(samples_dir / "coffee.png", root / "sub dir" / "ünï" / "café.png")
    return root


def copy_without_metadata(src: Path, dst: Path) -> None:
    """Copy a sample photo as a PNG without its XMP packet and ICC profile (same pixels): for
    tests that hold small images to small targets, where kept metadata would take the room."""
    from PIL import Image

    with Image.open(src) as im:
        im.save(dst, format="PNG", icc_profile=None)


def in_ci() -> bool:
    return bool(os.environ.get("CI"))
