"""Weights reach the codecs through the storage layer: outages are ridden out, then reported.

Codecs take bytes (``codecs/weights.py``); ``workers/codec_loader.py`` reads a ``weights``
URL with ``storage.with_retries``, like every other read of a job. Here a store that does
not answer at first (a real S3 server behind a loopback port that refuses connections for
a while), a filesystem raising transient errors, and a store that stays down.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from ratefit.codecs.gain_hyperprior import GainHyperpriorCodec, export_weights
from ratefit.codecs.gained import GainedHyperprior, ModelConfig
from ratefit.codecs.registry import get_codec
from ratefit.codecs.weights import WeightsError
from ratefit.workers import storage
from ratefit.workers.codec_loader import load_codec, zoo_sources
from ratefit.workers.storage import StorageUnavailable

TINY = ModelConfig(N=8, M=12, lambdas=(0.002, 0.02, 0.2))


@pytest.fixture(scope="module")
def weights_bytes() -> bytes:
    torch.manual_seed(0)
    return export_weights(GainedHyperprior(TINY))


class _LateProxy:
    """A TCP port on 127.0.0.1 that refuses connections for ``down_s``, then forwards to ``target``."""

    def __init__(self, target: int, down_s: float):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.target, self.down_s, self.closed = target, down_s, False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        time.sleep(self.down_s)
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self.listener.settimeout(0.2)
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True


def test_weights_on_s3_are_read_through_an_outage(s3_server, s3fs_client, weights_bytes, caplog):
    bucket = "loader-weights"
    if not s3fs_client.exists(bucket):
        s3fs_client.mkdir(bucket)
    s3fs_client.pipe_file(f"{bucket}/tiny.safetensors", weights_bytes)
    proxy = _LateProxy(s3_server.port, down_s=1.5)
    try:
        options = {**s3_server.storage_options, "skip_instance_cache": True,
                   "config_kwargs": {"retries": {"max_attempts": 0}},   # no retries of botocore's own
                   "client_kwargs": {**s3_server.storage_options["client_kwargs"],
                                     "endpoint_url": f"http://127.0.0.1:{proxy.port}"}}
        with caplog.at_level(logging.WARNING, logger="ratefit"):
            codec = load_codec("gain-hyperprior", weights=f"s3://{bucket}/tiny.safetensors",
                               storage_options=options, device="cpu")
    finally:
        proxy.close()
    assert codec.weights_sha256 == hashlib.sha256(weights_bytes).digest()   # the file's own bytes
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries and all(f"read {bucket}/tiny.safetensors" in m for m in retries), caplog.text
    assert s3_server.secret_key not in caplog.text


def test_a_store_that_stays_down_raises_storage_unavailable(monkeypatch, tmp_path, weights_bytes):
    path = tmp_path / "w.safetensors"
    path.write_bytes(weights_bytes)
    monkeypatch.setattr(storage, "STORAGE_RETRY_S", 0.5)

    def down(self, *args, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(LocalFileSystem, "cat_file", down)
    with pytest.raises(StorageUnavailable, match=r"read .*w\.safetensors: storage unreachable"):
        load_codec("gain-hyperprior", weights=str(path), device="cpu")


def test_zoo_folders_are_listed_and_read_with_retries(monkeypatch, tmp_path):
    (tmp_path / "bmshj2018-hyperprior-2-abcdef12.pth.tar").write_bytes(b"two")
    (tmp_path / "bmshj2018-hyperprior-5.pth").write_bytes(b"five")
    (tmp_path / "notes.txt").write_bytes(b"not a checkpoint")
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls: dict[str, int] = {}

    def flaky(name):
        real = getattr(LocalFileSystem, name)

        def op(self, *args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                raise TimeoutError(f"{name}: no answer")
            return real(self, *args, **kwargs)
        return op

    for name in ("isdir", "ls", "cat_file"):
        monkeypatch.setattr(LocalFileSystem, name, flaky(name))
    sources = zoo_sources("bmshj2018-hyperprior", str(tmp_path), tuple(range(1, 9)))
    assert [(s.quality, s.label.rsplit("/", 1)[-1]) for s in sources] == [
        (2, "bmshj2018-hyperprior-2-abcdef12.pth.tar"), (5, "bmshj2018-hyperprior-5.pth")]
    assert sources[1].read() == b"five" and sources[0].read() == b"two"
    assert calls == {"isdir": 2, "ls": 2, "cat_file": 3}
    with pytest.raises(WeightsError, match=r"no mbt2018-mean checkpoint in .* \(looked for mbt2018-mean-<quality>"):
        zoo_sources("mbt2018-mean", str(tmp_path), tuple(range(1, 9)))


def test_codecs_refuse_urls_and_take_bytes(weights_bytes, tmp_path):
    with pytest.raises(WeightsError, match="build it with ratefit.workers.codec_loader.load_codec"):
        GainHyperpriorCodec(weights=str(tmp_path / "w.safetensors"), device="cpu")
    with pytest.raises(WeightsError, match="load_codec"):
        get_codec("compressai:mbt2018-mean", weights=str(tmp_path), device="cpu")
    codec = GainHyperpriorCodec(weights=weights_bytes, device="cpu")
    assert codec.weights_sha256 == hashlib.sha256(weights_bytes).digest()
