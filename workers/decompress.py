"""Decompress one container back to a PNG at the mirrored path."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from ratefit.codecs import container
from ratefit.codecs.base import Codec, CodecError, payload_weights_sha256
from ratefit.codecs.registry import accepts_option
from ratefit.workers.codec_loader import load_codec
from ratefit.workers.items import Item
from ratefit.workers.manifest import DECOMPRESS_SCHEMA
from ratefit.workers.memory import with_tile_fallback
from ratefit.workers.processor import ItemProcessor
from ratefit.workers.read import DEFAULT_MAX_PIXELS, ItemError, read_bytes
from ratefit.workers.storage import atomic_write, full_url, open_fs, redact, safe_join


def restored_relpath(relpath: str) -> str:
    """``a/b.jpg.avif.rfic`` → ``a/b.jpg.png``; ``a/b.png.webp.rfic`` → ``a/b.png``.

    The container suffix and the codec's own suffix come off, giving the original
    relative path; a PNG keeps its name, anything else gets ``.png`` appended so two
    inputs can never restore to the same file.
    """
    stem = relpath[: -len(container.SUFFIX)] if relpath.endswith(container.SUFFIX) else relpath
    head, dot, _codec_ext = stem.rpartition(".")
    original = head if dot and "/" not in _codec_ext else stem
    return original if original.lower().endswith(".png") else original + ".png"


@dataclass
class DecompressConfig:
    output: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    codec_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per codec name
    # --weights without --codec: for every codec in the containers that takes weights
    learned_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS


def check_container(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[container.Header, bytes]:
    """Parse a stored container and hold its claimed size to the pixel limit, before any decoding."""
    try:
        header, payload = container.unpack(data)
    except container.ContainerError as e:
        raise ItemError("decode", str(e)) from None
    if header.width * header.height > max_pixels:
        raise ItemError("decode", f"container claims {header.width}x{header.height} = "
                                  f"{header.width * header.height} pixels, over the limit of {max_pixels} "
                                  "(refused before decoding; raise --max-pixels to allow it)")
    return header, payload


def decode_payload(codec: Codec, header: container.Header, payload: bytes) -> np.ndarray:
    """The codec's picture for a checked container; a codec failure is an ItemError, never a crash."""
    try:
        pixels = codec.decode(payload, header.width, header.height, header.value)
    except CodecError as e:
        raise ItemError("decode", str(e)) from None
    if pixels.shape != (header.height, header.width, 3) or pixels.dtype != np.uint8:
        raise ItemError("decode", f"{header.codec} decoded to {pixels.dtype} {pixels.shape}, "
                                  f"header says {header.width}x{header.height}")
    return pixels


def decode_container(data: bytes, codec_for: Callable[[container.Header], Codec],
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[container.Header, np.ndarray]:
    """Check and decode one stored container; every failure is an ItemError at stage ``decode``.

    The one path untrusted bitstreams take (decompress jobs, ``--verify``, ``ratefit fuzz``):
    the header is checked, the claimed size is held to the pixel limit before anything is
    allocated, and the codec's own errors are reported as such, never as a crash.
    """
    header, payload = check_container(data, max_pixels)
    return header, decode_payload(codec_for(header), header, payload)


class Decompressor(ItemProcessor):
    schema = DECOMPRESS_SCHEMA

    def __init__(self, config: DecompressConfig):
        self.config = config
        self.out_fs, self.out_root = open_fs(config.output, config.storage_options)
        self._codecs: dict[str, Codec] = {}

    def codec_for(self, header: container.Header) -> Codec:
        if header.codec not in self._codecs:
            opts = self.config.codec_options.get(header.codec)
            if opts is None:
                opts = self.config.learned_options if accepts_option(header.codec, "weights") else {}
            try:
                self._codecs[header.codec] = load_codec(header.codec, **opts)
            except KeyError as e:
                raise ItemError("decode", f"unknown codec {header.codec!r} in container ({e.args[0]})") from None
            except (CodecError, ValueError) as e:   # e.g. weights missing or not fitting the model
                raise ItemError("decode", f"cannot load codec {header.codec}: {e}") from None
        return self._codecs[header.codec]

    @staticmethod
    def check_weights(codec: Codec, header: container.Header, payload: bytes) -> None:
        """Refuse a container written with other weights than the ones loaded."""
        try:
            loaded = payload_weights_sha256(codec, payload)
        except (CodecError, ValueError) as e:
            raise ItemError("decode", f"{header.codec}: {e}") from None
        if header.weights_sha256 != loaded:
            raise ItemError("decode", f"container was written with {header.codec} weights "
                                      f"{header.weights_sha256.hex()[:16] or '(none)'}…, loaded weights are "
                                      f"{loaded.hex()[:16] or '(none)'}…")

    def decode(self, data: bytes, what: str) -> tuple[container.Header, np.ndarray]:
        """decode_container, retried alone with smaller tiles if the device runs out of memory."""
        header, payload = check_container(data, self.config.max_pixels)
        codec = self.codec_for(header)
        self.check_weights(codec, header, payload)
        pixels = with_tile_fallback(codec, lambda: decode_payload(codec, header, payload),
                                    max(header.width, header.height), what)
        return header, pixels

    def process(self, item: Item, row: dict[str, Any], stages: list[str]) -> None:
        try:
            out_path = safe_join(self.out_root, restored_relpath(item.relpath))
        except ValueError as e:
            raise ItemError("plan", str(e)) from None
        row["output_uri"] = redact(full_url(self.out_fs, out_path))
        stages.append("read")
        in_fs, in_path = open_fs(item.uri, self.config.storage_options)
        data = read_bytes(in_fs, in_path)
        row["input_bytes"] = len(data)
        stages.append("decode")
        t0 = time.perf_counter()
        header, pixels = self.decode(data, item.uri)
        row["codec"] = header.codec
        row["decode_ms"] = (time.perf_counter() - t0) * 1000.0
        stages.append("write")
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=3)
        atomic_write(self.out_fs, out_path, buf.getvalue())
        row.update(status="ok", width=header.width, height=header.height, output_bytes=buf.tell())
