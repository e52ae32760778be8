"""Where a ``compressai:<name>`` codec's networks come from, and how they are loaded.

``--weights`` (codec option ``weights``) names one of:

* a checkpoint file (any fsspec URL: a path, ``s3://…``, ``https://…``): one network. Its
  quality comes from a zoo-style name (``mbt2018-mean-3-723404a8.pth.tar`` is quality 3);
  another name makes it quality 0, "the one network";
* a folder (or S3 prefix) of zoo-style files, e.g. torch.hub's own cache
  (``~/.cache/torch/hub/checkpoints``): every quality found there, each loaded only when
  a target first needs it;
* ``zoo``: CompressAI's published URLs, downloaded once by torch.hub into its cache
  (``$TORCH_HOME``), so only on machines with network access or a filled cache.

Checkpoints are PyTorch files holding a state dict (CompressAI's zoo format, or a training
checkpoint with a ``state_dict`` entry). They load with ``weights_only=True``: a
checkpoint is never unpickled as arbitrary objects. The SHA-256 of each file's bytes is its
identity in the containers it writes.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import fsspec
import torch

from ratefit.codecs.weights import WeightsError

ZOO_WEIGHTS = "zoo"
_HUB = "torchhub:"
_CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar")


@dataclass(frozen=True)
class Source:
    """One network's checkpoint: its zoo quality (0: the only one) and where it is."""

    quality: int
    url: str

    @property
    def label(self) -> str:
        return self.url.removeprefix(_HUB)


def zoo_urls(zoo_name: str) -> dict[int, str]:
    """CompressAI's published MSE checkpoints for ``zoo_name``, by quality (0 for a VBR model)."""
    from compressai.zoo import image, image_vbr

    if zoo_name in image_vbr.model_urls:
        return {0: image_vbr.model_urls[zoo_name]["mse"]}
    return dict(image.model_urls[zoo_name]["mse"])


def quality_in_name(zoo_name: str, filename: str) -> int | None:
    """The quality a zoo-style file name gives (``<zoo name>-<q>[-<hash>].pth[.tar]``), else None."""
    m = re.fullmatch(re.escape(zoo_name) + r"-(\d{1,2})(?:-[0-9a-f]{6,64})?(?:\.pth\.tar|\.pth|\.pt|\.tar)",
                     filename)
    return int(m.group(1)) if m else None


def find_sources(zoo_name: str, weights: str, qualities: Sequence[int],
                 storage_options: dict[str, Any] | None = None) -> list[Source]:
    """The networks ``weights`` offers for ``zoo_name``, sorted by quality.

    ``qualities`` is what the zoo defines for this model (empty for a single-network VBR
    model). Raises WeightsError naming what was looked for when nothing usable is there.
    """
    if weights == ZOO_WEIGHTS:
        urls = zoo_urls(zoo_name)
        return [Source(q, _HUB + url) for q, url in sorted(urls.items())]
    try:
        fs, path = fsspec.core.url_to_fs(weights, **(storage_options or {}))
        is_dir = fs.isdir(path)
        names = [p for p in fs.ls(path, detail=False)] if is_dir else []
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read weights {weights}: {e}") from e
    if not is_dir:
        if not fs.exists(path):
            raise WeightsError(f"weights {weights} do not exist")
        q = quality_in_name(zoo_name, path.rsplit("/", 1)[-1]) if qualities else None
        return [Source(q if q in qualities else 0, weights)]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found: dict[int, Source] = {}
    for p in sorted(names):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        url = p if protocol in ("file", "local") else fs.unstrip_protocol(p)
        if qualities:
            q = quality_in_name(zoo_name, name)
            if q in qualities:
                found.setdefault(q, Source(q, url))
        elif name.startswith(zoo_name.removesuffix("-vbr")) and "vbr" in name and name.endswith(_CHECKPOINT_SUFFIXES):
            found.setdefault(0, Source(0, url))
    if not found:
        want = (f"{zoo_name}-<quality>[-<hash>].pth.tar, quality in {min(qualities)}..{max(qualities)}"
                if qualities else f"{zoo_name.removesuffix('-vbr')}-mse-vbr-<hash>.pth.tar")
        raise WeightsError(f"no {zoo_name} checkpoint in {weights} (looked for {want})")
    return [found[q] for q in sorted(found)]


def read_source(source: Source, storage_options: dict[str, Any] | None = None) -> bytes:
    """The checkpoint's bytes; ``zoo`` sources come from (and fill) torch.hub's cache."""
    if source.url.startswith(_HUB):
        url = source.url[len(_HUB):]
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            m = re.search(r"-([a-f0-9]+)\.", os.path.basename(url))
            try:
                torch.hub.download_url_to_file(url, path, hash_prefix=m.group(1) if m else None, progress=False)
            except Exception as e:
                raise WeightsError(f"cannot download {url} into torch.hub's cache ({path}): {e}. "
                                   "Without network access, pass --weights FILE_OR_FOLDER instead") from e
        source = Source(source.quality, path)
    try:
        with fsspec.open(source.url, "rb", **(storage_options or {})) as f:
            return f.read()
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read weights {source.label}: {e}") from e


def load_state_dict(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict, loaded without unpickling arbitrary objects."""
    from compressai.zoo.pretrained import load_pretrained

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{what} is not a checkpoint that loads with weights_only=True: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]   # a training checkpoint (CompressAI's examples/train.py)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{what} holds no state dict of tensors")
    return load_pretrained(obj)   # CompressAI's own renaming of older key names


_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def cached(key: tuple, build: Any) -> Any:
    """One built network per (model, source, device) in this process: a worker fetches once."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
