"""Shared fixtures: a real local Ray, a real S3 server on 127.0.0.1, and the photos; and
``ray_cluster``, a standing multi-node Ray cluster of ``ray start`` processes on 127.0.0.1.

Nothing here is mocked: Ray workers are separate processes, so only a real server can
reach them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

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


# ---------------------------------------------------------------- standing Ray clusters on 127.0.0.1
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start_env() -> dict[str, str]:
    """The environment of ``ray start`` and of the drivers that join it: loopback only (see
    ratefit.cluster.connect.loopback_only), no usage statistics, token authentication as Ray
    2.5x clusters use (the token is ``~/.ray/auth_token``)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return env


# `ray start --address` (a worker node) refuses to start while multi-node support is off
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and with it on Ray swaps 127.0.0.1 for the machine's
# routable address. So a worker node runs the same CLI with that check passed and its address
# kept on loopback; the processes it starts inherit the loopback environment.
_WORKER_NODE_MAIN = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
from ray.scripts.scripts import main
constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"
sys.argv[0] = "ray"
sys.exit(main())
"""


def _agent_ports() -> list[str]:
    # Every port ray start would otherwise take at a fixed default (the dashboard agent's 52365,
    # the client server's 10001), chosen free, so an embedded Ray of another test in this
    # session, or another node of the same cluster, cannot collide with it.
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def stop_ray_node(proc: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` process and everything it started (its own session)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)   # `ray start --block` has not once exited on SIGTERM within 30 s here
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class RayCluster:
    """A head (``ray start --head --block`` on 127.0.0.1) and the worker nodes added to it."""

    def __init__(self, head: subprocess.Popen, address: str, env: dict[str, str], temp_dir: str,
                 dashboard_url: str | None):
        self.head, self.address, self.env, self.temp_dir = head, address, env, temp_dir
        self.dashboard_url = dashboard_url
        self.nodes: list[subprocess.Popen] = []

    def add_node(self, num_cpus: int, num_gpus: int = 0) -> subprocess.Popen:
        """A worker node joining the head (``ray start --address ... --block``); it runs until
        ``stop_ray_node`` or the end of the cluster. ``num_gpus`` declares logical GPUs (no CUDA
        needed: actors given one see CUDA_VISIBLE_DEVICES but torch finds no device)."""
        log = open(Path(self.temp_dir) / f"node-{len(self.nodes)}.log", "wb")
        node = subprocess.Popen(
            [sys.executable, "-c", _WORKER_NODE_MAIN, "start", "--block", f"--address={self.address}",
             "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
             *_agent_ports(), "--disable-usage-stats"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.nodes.append(node)
        return node


@contextlib.contextmanager
def ray_cluster(num_cpus: int, *, dashboard: bool = False) -> Iterator[RayCluster]:
    """A standing Ray cluster on 127.0.0.1 whose head has ``num_cpus`` CPUs; every node it ever
    had is stopped on the way out, the nodes first, whatever happened."""
    bin_dir = Path(sys.executable).parent
    gcs_port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rf-", dir="/tmp")   # keeps its ray_current_cluster apart
    env = ray_start_env()
    args = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
            f"--ray-client-server-port={free_port()}", *_agent_ports(), f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    dashboard_url = None
    if dashboard:
        dash_port = free_port()
        args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true"]
        dashboard_url = f"http://127.0.0.1:{dash_port}"
    else:
        args.append("--include-dashboard=false")
    head_log = Path(temp_dir) / "head.log"   # a file, not a pipe nobody reads (a full one would block it)
    with open(head_log, "wb") as log:
        head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = RayCluster(head, f"127.0.0.1:{gcs_port}", env, temp_dir, dashboard_url)
    try:
        deadline = time.monotonic() + 120
        while True:   # the GCS answers: drivers and nodes can join (they wait for the rest)
            if head.poll() is not None:
                pytest.fail(f"ray start exited early:\n{head_log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the Ray head did not come up in 120 s")
            try:
                socket.create_connection(("127.0.0.1", gcs_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            stop_ray_node(node)
        stop_ray_node(head)
