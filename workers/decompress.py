"""Decompress one output back to a PNG at the mirrored path, with what travelled beside it.

An output is an RFIC container (the learned codecs, and classical outputs written before plain
files) or a plain file planned from the manifest (``StoredOutput``). The PNG carries the alpha,
the ICC profile (iCCP), EXIF (eXIf) and XMP (iTXt ``XML:com.adobe.xmp``) that the output kept.
An output that restores its original (jxl-lossless of a JPEG) gives back the original file.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import PngImagePlugin

from ratefit.codecs import container
from ratefit.codecs.base import NO_EXTRAS, Codec, CodecError, Extras, capabilities_of, payload_weights_sha256
from ratefit.codecs.pillow import image_with_extras
from ratefit.codecs.registry import accepts_option
from ratefit.workers.codec_loader import load_codec
from ratefit.workers.items import Item, StoredOutput
from ratefit.workers.manifest import DECOMPRESS_SCHEMA
from ratefit.workers.memory import with_tile_fallback
from ratefit.workers.processor import ItemProcessor
from ratefit.workers.read import DEFAULT_MAX_PIXELS, ItemError, read_bytes
from ratefit.workers.storage import atomic_write, full_url, open_fs, redact, safe_join


def restored_relpath(relpath: str, original_file: bool = False) -> str:
    """``a/b.jpg.avif.rfic`` and ``a/b.jpg.avif`` → ``a/b.jpg.png``; ``a/b.png.webp`` → ``a/b.png``.

    The container suffix and the codec's own suffix come off, giving the original
    relative path; a PNG keeps its name, anything else gets ``.png`` appended so two
    inputs can never restore to the same file. ``original_file``: the output restores the
    input file itself (``a/b.jpg.jxl`` → ``a/b.jpg``).
    """
    stem = relpath[: -len(container.SUFFIX)] if relpath.endswith(container.SUFFIX) else relpath
    head, dot, _codec_ext = stem.rpartition(".")
    return restored_name(head if dot and "/" not in _codec_ext else stem, original_file)


def restored_name(name: str, original_file: bool = False) -> str:
    """Where an item named ``name`` (its input's relative path) is restored: ``a/b.jpg`` →
    ``a/b.jpg.png``, a PNG keeps its name, and a restored original file its own."""
    if original_file:
        return name
    return name if name.lower().endswith(".png") else name + ".png"


def png_bytes(pixels: np.ndarray, extras: Extras = NO_EXTRAS) -> bytes:
    """A PNG of ``pixels`` carrying the alpha, ICC profile, EXIF and XMP of ``extras``."""
    im = image_with_extras(pixels, extras)
    options: dict[str, Any] = {"compress_level": 3}
    if extras.icc:
        options["icc_profile"] = extras.icc
    if extras.exif:
        options["exif"] = extras.exif
    if extras.xmp:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", extras.xmp.decode("utf-8", "replace"))
        options["pnginfo"] = info
    buf = io.BytesIO()
    im.save(buf, format="PNG", **options)
    return buf.getvalue()


@dataclass
class DecompressConfig:
    output: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    codec_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per codec name
    # --weights without --codec: for every codec in the containers that takes weights
    learned_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS
    progressive: int | None = None        # decode only the first K latent groups (codecs with ``progressive``)
    item_timeout_s: float | None = 600.0  # --item-timeout: an item past it is an error row (processor.py)


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


def decode_payload(codec: Codec, header: container.Header, payload: bytes, groups: int | None = None) -> np.ndarray:
    """The codec's picture for a checked container (the first ``groups`` latent groups only, if
    given); a codec failure is an ItemError, never a crash."""
    try:
        return container.decode_checked(codec, header, payload, groups)
    except CodecError as e:
        raise ItemError("decode", str(e)) from None


def decode_plain(codec: Codec, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
    """The picture of a plain-file output whose size the manifest gives (checked by the codec)."""
    header = container.Header(codec=codec.name, weights_sha256=b"", value=value, width=width, height=height,
                              mode="", payload_length=len(payload), crc32=0)
    return decode_payload(codec, header, payload)


def stored_extras(codec: Codec, payload: bytes, header: container.Header | None = None) -> Extras:
    """What travelled beside the colour: a container's sections, or what a plain file embeds."""
    try:
        if header is not None:
            return container.extras_of(header)
        if capabilities_of(codec).embeds:
            return codec.extras_of(payload)
    except (container.ContainerError, CodecError) as e:
        raise ItemError("decode", str(e)) from None
    return NO_EXTRAS


def decode_container(data: bytes, codec_for: Callable[[container.Header], Codec],
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[container.Header, np.ndarray]:
    """Check and decode one stored container; every failure is an ItemError at stage ``decode``.

    The one path untrusted bitstreams take (decompress jobs, ``--verify``, ``ratefit fuzz``):
    the header is checked, the claimed size is held to the pixel limit before anything is
    allocated, and the codec's own errors are reported as such, never as a crash.
    """
    header, payload = check_container(data, max_pixels)
    return header, decode_payload(codec_for(header), header, payload)


@dataclass
class Restored:
    """What a stored output gives back: the picture and what travelled beside it, or the
    input file itself (``original``, jxl-lossless of a JPEG; ``pixels`` is then None)."""

    codec: Codec
    pixels: np.ndarray | None
    extras: Extras
    original: bytes | None = None


def read_stored(fs: Any, path: str, stored: StoredOutput | None) -> bytes:
    """An output's bytes: the whole object, or its member's range in a tar shard (one ranged GET)."""
    if stored is None or stored.offset is None:
        return read_bytes(fs, path)
    if not stored.length:
        raise ItemError("read", f"the manifest row locates no bytes in {path} (offset {stored.offset}, "
                                f"length {stored.length})")
    return read_bytes(fs, path, stored.offset, stored.length)


class Restorer:
    """Stored output bytes back to pixels, the way ``ratefit decompress`` writes them.

    One per worker (codecs load once); decompress jobs and the reading API
    (``workers/reading.py``) share it, so a reader gets the very pixels decompress would write.
    A container says which codec and weights it needs; a plain file or a tar member is named
    by its manifest row (``StoredOutput``), whose checksum it must match.
    """

    def __init__(self, codec_options: dict[str, dict[str, Any]] | None = None,
                 learned_options: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 progressive: int | None = None):
        self.progressive = progressive
        self.codec_options = codec_options or {}
        self.learned_options = learned_options or {}
        self.max_pixels = max_pixels
        self._codecs: dict[str, Codec] = {}

    def codec_for(self, header: container.Header) -> Codec:
        return self.load(header.codec)

    def load(self, name: str) -> Codec:
        """The codec a container's header or a manifest row names, loaded once per worker."""
        if name not in self._codecs:
            opts = self.codec_options.get(name)
            if opts is None:
                opts = self.learned_options if accepts_option(name, "weights") else {}
            try:
                self._codecs[name] = load_codec(name, **opts)
            except KeyError as e:
                raise ItemError("decode", f"unknown codec {name!r} ({e.args[0]})") from None
            except (CodecError, ValueError) as e:   # e.g. weights missing or not fitting the model
                raise ItemError("decode", f"cannot load codec {name}: {e}") from None
        return self._codecs[name]

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
        header, payload = check_container(data, self.max_pixels)
        codec = self.codec_for(header)
        self.check_weights(codec, header, payload)
        pixels = with_tile_fallback(codec, lambda: decode_payload(codec, header, payload, self.progressive),
                                    max(header.width, header.height), what)
        return header, pixels

    def restore(self, data: bytes, stored: StoredOutput | None, what: str) -> Restored:
        """A stored output's picture and extras (or original file); every failure is an ItemError."""
        if stored is not None and stored.sha256 and hashlib.sha256(data).hexdigest() != stored.sha256:
            raise ItemError("decode", f"checksum mismatch: {len(data)} B output is not the one its manifest "
                                      "row names (changed or corrupt)")
        if data[:len(container.MAGIC)] == container.MAGIC:
            header, pixels = self.decode(data, what)
            codec = self.codec_for(header)
            return Restored(codec, pixels, stored_extras(codec, data, header))
        if stored is None:
            raise ItemError("decode", "not a ratefit container (no RFIC header), and no manifest row names it")
        return self.restore_plain(data, stored)

    def restore_plain(self, data: bytes, stored: StoredOutput) -> Restored:
        """A plain-file output, sized by its row (there is no header to say it)."""
        if not stored.width or not stored.height:
            raise ItemError("decode", "the manifest row gives no image size")
        if stored.width * stored.height > self.max_pixels:
            raise ItemError("decode", f"manifest row says {stored.width}x{stored.height} = "
                                      f"{stored.width * stored.height} pixels, over the limit of "
                                      f"{self.max_pixels} (raise --max-pixels to allow it)")
        codec = self.load(stored.codec)
        if self.progressive is not None and not capabilities_of(codec).progressive:
            raise ItemError("decode", f"{stored.codec} does not decode progressively (no latent groups to stop after)")
        original = codec.original_of(data) if capabilities_of(codec).restores_original else None
        if original is not None:
            return Restored(codec, None, NO_EXTRAS, original)
        pixels = decode_plain(codec, data, stored.width, stored.height, stored.value or 0.0)
        return Restored(codec, pixels, stored_extras(codec, data))


class Decompressor(ItemProcessor):
    schema = DECOMPRESS_SCHEMA

    def __init__(self, config: DecompressConfig):
        self.config = config
        self.out_fs, self.out_root = open_fs(config.output, config.storage_options)
        self.restorer = Restorer(config.codec_options, config.learned_options, config.max_pixels,
                                 config.progressive)

    def codec_for(self, header: container.Header) -> Codec:
        return self.restorer.codec_for(header)

    def process(self, item: Item, row: dict[str, Any], stages: list[str]) -> None:
        stages.append("read")
        in_fs, in_path = open_fs(item.uri, self.config.storage_options)
        data = read_stored(in_fs, in_path, item.stored)
        row["input_bytes"] = len(data)
        stages.append("decode")
        t0 = time.perf_counter()
        restored = self.restorer.restore(data, item.stored, item.uri)
        row["codec"] = restored.codec.name
        if restored.pixels is not None:
            row.update(width=restored.pixels.shape[1], height=restored.pixels.shape[0])
        row["decode_ms"] = (time.perf_counter() - t0) * 1000.0
        original = restored.original
        name = item.stored.name if item.stored is not None and item.stored.name else None
        try:
            relpath = (restored_name(name, original is not None) if name is not None
                       else restored_relpath(item.relpath, original_file=original is not None))
            out_path = safe_join(self.out_root, relpath)
        except ValueError as e:
            raise ItemError("plan", str(e)) from None
        row["output_uri"] = redact(full_url(self.out_fs, out_path))
        stages.append("write")
        out = original if original is not None else png_bytes(restored.pixels, restored.extras)
        atomic_write(self.out_fs, out_path, out)
        row.update(status="ok", output_bytes=len(out))
