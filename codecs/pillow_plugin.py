"""A Pillow plugin for ratefit's containers: ``Image.open("x.rfic")`` from any program.

Why: a ratefit OUTPUT holds its learned-codec results (and classical results written before
plain files) as RFIC containers, which no viewer, notebook or image pipeline knows. Without
this module, reading one means running ``ratefit decompress`` to a folder of PNGs first.
Importing it registers a Pillow format ``"RFIC"`` (extension ``.rfic``), so any code that
takes a path or a file object and calls ``PIL.Image.open`` reads the container directly:
the same pixels ``ratefit decompress`` writes (``codec.decode`` of the payload, plus the
container's alpha section: mode ``RGB``, or ``RGBA`` when the container kept an alpha), with
``icc_profile``, ``exif`` and ``xmp`` (bytes) in ``im.info`` when the container has them.
It also imports ``pillow_jxl`` when installed, so ratefit's plain ``.jxl`` outputs open too
(``.avif``, ``.webp`` and ``.jpg`` outputs open in plain Pillow already).

Usage (make a container first, e.g.
``ratefit compress photos/ out/ --codec gain-hyperprior --target-bpp 0.5 --in-process``)::

    import numpy as np
    from PIL import Image

    import ratefit.codecs.pillow_plugin  # noqa: F401  (registers the RFIC format)

    with Image.open("out/chelsea.png.ghp.rfic") as im:   # a path or any binary file object
        print(im.format, im.mode, im.size, sorted(im.info))
        pixels = np.asarray(im)                          # HxWx3 (or HxWx4) uint8
        im.save("chelsea.png")                           # keeps the ICC profile, as Pillow does

Weights: a container names the weights that wrote it by their SHA-256 and decodes only with
those. The weights bundled with ratefit (the default ``gain-hyperprior``) are found by
themselves; any other weights (a trained ``gain-hyperprior`` file, CompressAI checkpoints for
``compressai:*`` containers) must be registered once per process::

    from ratefit.codecs import pillow_plugin

    pillow_plugin.register_weights("gain-hyperprior", "my-model.safetensors")   # path, bytes or WeightsFile
    pillow_plugin.register_weights("compressai:mbt2018-mean", "~/.cache/torch/hub/checkpoints")  # folder or file

A container whose weights are not available fails at ``load()`` (the first access to its
pixels) with ``WeightsUnavailable`` naming the codec and the SHA-256. Corrupt or truncated
containers fail in ``Image.open`` with ``ContainerError``, payloads that do not decode in
``load()`` with ``RficError``; all are ``ValueError`` subclasses. Header sizes over twice
``Image.MAX_IMAGE_PIXELS`` raise ``Image.DecompressionBombError`` before anything is decoded.

This module reads local files with plain Python and nothing else: weights at a URL must be
read by the caller (``ratefit.workers.codec_loader`` does that inside ratefit) and given as
bytes. Built codecs are cached per codec name and weights SHA-256 (models stay loaded);
``clear_weights()`` forgets the registrations and the loaded models.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image, ImageFile

from ratefit.codecs import container
from ratefit.codecs.base import Codec, CodecError, Extras, capabilities_of, payload_weights_sha256
from ratefit.codecs.pillow import image_with_extras
from ratefit.codecs.registry import factory_of, get_codec

try:   # ratefit's plain .jxl outputs: pillow-jxl-plugin registers JPEG XL with Pillow on import
    import pillow_jxl  # noqa: F401
except ImportError:    # pragma: no cover - an install without the jxl extra
    pillow_jxl = None

__all__ = ["FORMAT", "RficError", "RficImageFile", "WeightsUnavailable", "clear_weights", "register_weights"]

FORMAT = "RFIC"
DESCRIPTION = "ratefit image container"
_ALPHA = container.SECTION_TAGS["alpha"]
_INFO_SECTIONS = {"icc_profile": container.SECTION_TAGS["icc"], "exif": container.SECTION_TAGS["exif"],
                  "xmp": container.SECTION_TAGS["xmp"]}
# What a codec factory's ``weights_input`` says (the constants of codecs/weights.py, which imports
# torch: this module does not, until a learned codec is needed).
_FILE, _CHECKPOINTS = "file", "checkpoints"
_CHUNK = 1 << 20


class RficError(ValueError):
    """An RFIC container could not be decoded; the message names the file and the cause."""


class WeightsUnavailable(RficError):
    """The weights a container was written with are neither bundled nor registered."""


# ------------------------------------------------------------------------------ weights registry

@dataclass
class _Checkpoint:
    """One CompressAI checkpoint offered for ``compressai:*`` containers (read and hashed lazily)."""

    label: str
    quality: int | None                  # the quality its zoo-style name (or Source) gives; None: unknown
    read: Callable[[], bytes] = field(repr=False)
    path: str | None = None
    _sha: tuple[Any, bytes] | None = field(default=None, repr=False)   # (file stamp, SHA-256)

    def sha256(self) -> bytes:
        if self.path is None:
            if self._sha is None:
                self._sha = (None, hashlib.sha256(self.read()).digest())
            return self._sha[1]
        st = os.stat(self.path)
        stamp = (st.st_size, st.st_mtime_ns)
        if self._sha is None or self._sha[0] != stamp:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            self._sha = (stamp, h.digest())
        return self._sha[1]


_LOCK = threading.RLock()
_FILES: dict[str, dict[bytes, Any]] = {}          # codec -> weights SHA-256 -> WeightsFile
_ZOO: dict[str, list[_Checkpoint]] = {}           # codec -> checkpoints
_OTHER: dict[str, list[Any]] = {}                 # codec -> ``weights`` options as given (plugin codecs)
_DEFAULTS: dict[str, Codec | str] = {}            # codec -> built with default options, or why not
_CODECS: dict[tuple, Codec] = {}                  # (codec, weights SHA-256[, network]) -> built codec


def _read_local(path: str | os.PathLike, codec_name: str) -> tuple[str, bytes]:
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{codec_name} weights {path!r}: no such local file (this plugin reads local "
                                "files only; read other storage yourself and pass the bytes)")
    with open(path, "rb") as f:
        return path, f.read()


def register_weights(codec_name: str, weights: Any) -> None:
    """Make ``weights`` available for decoding containers of ``codec_name`` (by their SHA-256).

    ``weights`` is what that codec's ``weights`` option takes, or a local path to it:

    * ``gain-hyperprior`` / ``gain-hyperprior-roi`` (and other codecs reading one weights
      file): the file's bytes, a ``WeightsFile``, or a local path (read now). A file
      registered for one of them serves the other too (they share the format);
    * ``compressai:<zoo name>``: a checkpoint's bytes, a local checkpoint file, a local folder
      of zoo-style files (``mbt2018-mean-3-<hash>.pth.tar``, e.g. torch.hub's cache), or
      ``zoo_weights.Source`` objects (one or a list). Files are read and hashed only when a
      container needs them;
    * a plugin codec taking ``weights``: the object as its factory takes it (built when needed).

    Raises KeyError for an unknown codec, ValueError for a codec that takes no weights or a
    folder with no checkpoint of that model, FileNotFoundError for a missing local path.
    """
    factory = factory_of(codec_name)
    kind = getattr(factory, "weights_input", None)
    if kind not in (_FILE, _CHECKPOINTS) and not _names_weights(factory):
        raise ValueError(f"codec {codec_name} takes no weights (its containers decode without any)")
    if kind == _FILE:
        from ratefit.codecs.weights import WeightsFile

        if isinstance(weights, (bytes, bytearray, memoryview)):
            wf = WeightsFile(bytes(weights), "weights registered as bytes")
        elif isinstance(weights, WeightsFile):
            wf = weights
        elif isinstance(weights, (str, os.PathLike)):
            wf = WeightsFile(*reversed(_read_local(weights, codec_name)))
        else:
            raise TypeError(f"{codec_name} weights: expected bytes, a WeightsFile or a local path, "
                            f"got {type(weights).__name__}")
        with _LOCK:
            _FILES.setdefault(codec_name, {})[hashlib.sha256(wf.data).digest()] = wf
    elif kind == _CHECKPOINTS:
        found = _checkpoints(codec_name, factory, weights)
        with _LOCK:
            _ZOO.setdefault(codec_name, []).extend(found)
    else:
        with _LOCK:
            _OTHER.setdefault(codec_name, []).append(weights)


def _names_weights(factory: Any) -> bool:
    """Whether a factory has a parameter named ``weights`` (``**options`` alone does not count:
    the classical codecs take any option and hand it to the image encoder)."""
    import inspect

    try:
        return "weights" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _checkpoints(codec_name: str, factory: Any, weights: Any) -> list[_Checkpoint]:
    from ratefit.codecs.zoo_weights import Source, pick_checkpoints, quality_in_name

    zoo_name, qualities = factory.zoo_name, tuple(factory.qualities)
    if isinstance(weights, (bytes, bytearray, memoryview)):
        data = bytes(weights)
        return [_Checkpoint("checkpoint registered as bytes", None, lambda: data)]
    if isinstance(weights, Source):
        weights = [weights]
    if isinstance(weights, (list, tuple)) and weights and all(isinstance(s, Source) for s in weights):
        return [_Checkpoint(s.label, s.quality, s.read) for s in weights]
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"{codec_name} weights: expected a checkpoint's bytes, a local file or folder, or "
                        f"zoo_weights.Source objects, got {type(weights).__name__}")
    path = os.path.expanduser(os.fspath(weights))
    if os.path.isdir(path):
        entries = [os.path.join(path, n) for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n))]
        picked = pick_checkpoints(zoo_name, entries, qualities, path)   # WeightsError (a ValueError) if none
        return [_Checkpoint(p, q if qualities else None, _file_reader(p), path=p) for q, p in picked.items()]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{codec_name} weights {path!r}: no such local file or folder (this plugin reads "
                                "local files only; read other storage yourself and pass the bytes)")
    name = os.path.basename(path)
    quality = quality_in_name(zoo_name, name) if qualities else None
    if quality not in qualities:
        quality = None
    return [_Checkpoint(path, quality, _file_reader(path), path=path)]


def _file_reader(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()
    return read


def clear_weights() -> None:
    """Forget every registered weights and every loaded model (tests; freeing memory)."""
    with _LOCK:
        _FILES.clear()
        _ZOO.clear()
        _OTHER.clear()
        _DEFAULTS.clear()
        _CODECS.clear()


# ------------------------------------------------------------------------------ codec resolution

def _matches(codec: Codec, payload: bytes, sha: bytes) -> bool:
    try:
        return payload_weights_sha256(codec, payload) == sha
    except (CodecError, ValueError):   # e.g. a zoo codec without the network this payload names
        return False


def _build(name: str, what: str, **options: Any) -> Codec:
    try:
        return get_codec(name, **options)
    except (CodecError, ValueError, TypeError) as e:   # WeightsError is a ValueError
        raise RficError(f"{what}: cannot load codec {name}: {e}") from e


def _default(name: str) -> Codec | None:
    """The codec built with default options (bundled weights; codecs without weights), once."""
    if name not in _DEFAULTS:
        try:
            _DEFAULTS[name] = get_codec(name)
        except (CodecError, ValueError, TypeError) as e:   # zoo codecs need weights given
            _DEFAULTS[name] = f"{type(e).__name__}: {e}"
    found = _DEFAULTS[name]
    return None if isinstance(found, str) else found


def _registered_file(name: str, sha: bytes) -> Any:
    """A registered weights file with this SHA: this codec's first, then one of a codec sharing the format."""
    if sha in _FILES.get(name, {}):
        return _FILES[name][sha]
    for other, files in _FILES.items():
        if other != name and sha in files:
            return files[sha]
    return None


def _zoo_codec(name: str, factory: Any, sha: bytes, payload: bytes, what: str) -> Codec | None:
    from ratefit.codecs.zoo_weights import Source

    per_payload = capabilities_of(factory).per_payload_weights
    quality = payload[0] if per_payload and payload else None
    candidates = sorted(_ZOO.get(name, []), key=lambda c: c.quality != quality)   # the named quality first
    for cand in candidates:
        try:
            if cand.sha256() != sha:
                continue
        except OSError:
            continue   # a file gone since it was registered
        # One network per codec: a fixed-rate or autoregressive payload names its network's
        # quality in its first byte, so the checkpoint is offered at that quality.
        source = Source(quality if quality is not None else (cand.quality or 0),
                        f"{cand.label}#sha256={sha.hex()}", cand.read)
        codec = _build(name, what, weights=[source])
        if _matches(codec, payload, sha):
            return codec
    return None


def _codec_for(header: container.Header, payload: bytes, what: str) -> Codec:
    """The codec that decodes this container, with the weights its header names (built once)."""
    name, sha = header.codec, header.weights_sha256
    try:
        factory = factory_of(name)
    except KeyError as e:
        raise RficError(f"{what}: unknown codec {name!r} ({e.args[0]})") from None
    per_payload = capabilities_of(factory).per_payload_weights
    key = (name, sha, payload[0] if per_payload and payload else None)
    with _LOCK:
        codec = _CODECS.get(key)
        if codec is not None:
            return codec
        kind = getattr(factory, "weights_input", None)
        codec = None
        if kind == _FILE and (wf := _registered_file(name, sha)) is not None:
            codec = _build(name, what, weights=wf)
            if not _matches(codec, payload, sha):
                raise RficError(f"{what}: {name} weights registered as SHA-256 {sha.hex()} built a codec "
                                f"whose weights are {codec.weights_sha256.hex()}")
        if codec is None:
            default = _default(name)
            if default is not None and _matches(default, payload, sha):
                codec = default
        if codec is None and kind == _CHECKPOINTS:
            codec = _zoo_codec(name, factory, sha, payload, what)
        if codec is None:
            for weights in _OTHER.get(name, []):
                candidate = _build(name, what, weights=weights)
                if _matches(candidate, payload, sha):
                    codec = candidate
                    break
        if codec is None:
            raise WeightsUnavailable(_unavailable(name, sha, what))
        _CODECS[key] = codec
        return codec


def _unavailable(name: str, sha: bytes, what: str) -> str:
    default = _DEFAULTS.get(name)
    if isinstance(default, str) or default is None:
        bundled = "no weights are bundled for it"
    else:
        bundled = f"the bundled ones are {default.weights_sha256.hex()}"
    forms = "a local path or the file's bytes"
    if name.startswith("compressai:"):
        forms += ", or a folder of checkpoints"
    return (f"{what}: written by codec {name} with weights SHA-256 {sha.hex() or '(none)'}, which are not "
            f"available ({bundled}; registered for {name}: {_count_registered(name)}). Call "
            f"ratefit.codecs.pillow_plugin.register_weights({name!r}, WEIGHTS) with those weights "
            f"({forms}) before loading the image")


def _count_registered(name: str) -> str:
    n = len(_FILES.get(name, {})) + len(_ZOO.get(name, [])) + len(_OTHER.get(name, []))
    return "none" if not n else f"{n}, none with that SHA-256"


def _decode(header: container.Header, payload: bytes, what: str) -> Image.Image:
    """What ``ratefit decompress`` writes: the codec's picture, plus the alpha section (RGBA)."""
    codec = _codec_for(header, payload, what)
    try:
        pixels = container.decode_checked(codec, header, payload)
    except (CodecError, RuntimeError, ValueError) as e:
        raise RficError(f"{what}: {header.codec} payload does not decode: {e}") from None
    try:
        alpha = container.extras_of(header).alpha if _ALPHA in header.sections else None
    except container.ContainerError as e:
        raise RficError(f"{what}: {e}") from None
    return image_with_extras(pixels, Extras(alpha=alpha))


# ------------------------------------------------------------------------------ the Pillow plugin

def _check_pixels(width: int, height: int) -> None:
    """Pillow's own decompression-bomb rule, applied to the header's claim before decoding."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > 2 * limit:
        raise Image.DecompressionBombError(
            f"Image size ({width * height} pixels) exceeds limit of {2 * limit} pixels, "
            "could be decompression bomb DOS attack.")


def _accept(prefix: bytes) -> bool:
    return prefix[:len(container.MAGIC)] == container.MAGIC


class RficImageFile(ImageFile.ImageFile):
    """A ratefit container opened by Pillow: header read on open, pixels decoded on ``load()``."""

    format = FORMAT
    format_description = DESCRIPTION

    def _open(self) -> None:
        assert self.fp is not None
        data = self.fp.read()
        try:
            header, payload = container.unpack(data)
        except container.ContainerError as e:
            raise container.ContainerError(f"{self._what()}: {e}") from None
        _check_pixels(header.width, header.height)
        self._size = (header.width, header.height)
        self._mode = "RGBA" if _ALPHA in header.sections else "RGB"
        for key, tag in _INFO_SECTIONS.items():
            if tag in header.sections:
                self.info[key] = header.sections[tag]
        self.info.update(ratefit_codec=header.codec, ratefit_value=header.value,
                         ratefit_weights_sha256=header.weights_sha256.hex(), ratefit_original_mode=header.mode,
                         ratefit_container_version=header.version)
        self.rfic_header: container.Header | None = header
        self._payload: bytes | None = payload
        self.tile = []

    def _what(self) -> str:
        name = self.filename
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"RFIC file {name!r}" if name else "RFIC stream"

    def load(self) -> Any:
        if self._im is None and self._payload is not None:
            header = self.rfic_header
            assert header is not None
            _check_pixels(header.width, header.height)
            self.im = _decode(header, self._payload, self._what()).im
            self.readonly = 0
            self._payload = None   # decoded: the bytes are not needed again
            if self._exclusive_fp and self._close_exclusive_fp_after_loading and self.fp is not None:
                self.fp.close()
                self.fp = None
        return super().load()


Image.register_open(FORMAT, RficImageFile, _accept)
Image.register_extension(FORMAT, container.SUFFIX)
