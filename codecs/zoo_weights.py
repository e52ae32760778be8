"""Which networks a ``compressai:<name>`` codec's weights hold, and how a checkpoint loads.

``--weights`` (codec option ``weights``) names one of:

* a checkpoint file (any fsspec URL: a path, ``s3://…``, ``https://…``): one network. Its
  quality comes from a zoo-style name (``mbt2018-mean-3-723404a8.pth.tar`` is quality 3);
  another name makes it quality 0, "the one network";
* a folder (or S3 prefix) of zoo-style files, e.g. torch.hub's own cache
  (``~/.cache/torch/hub/checkpoints``): every quality found there, each loaded only when
  a target first needs it;
* ``zoo``: CompressAI's published URLs, downloaded once by torch.hub into its cache
  (``$TORCH_HOME``), so only on machines with network access or a filled cache.

The codec itself never opens any of these: ``ratefit.workers.codec_loader`` lists the folder
and reads the files through the storage layer (with its retries) or torch.hub's cache, and
hands the codec one ``Source`` per network, whose ``read`` returns the checkpoint's bytes.
This module holds what is the zoo's own knowledge: its file names, its URLs, its format.

Checkpoints are PyTorch files holding a state dict (CompressAI's zoo format, or a training
checkpoint with a ``state_dict`` entry). They load with ``weights_only=True``: a
checkpoint is never unpickled as arbitrary objects. The SHA-256 of each file's bytes is its
identity in the containers it writes.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ratefit.codecs.weights import WeightsError

ZOO_WEIGHTS = "zoo"
HUB_PREFIX = "torchhub:"   # a Source's url for a checkpoint of the zoo, read through torch.hub's cache
_CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar")


@dataclass(frozen=True)
class Source:
    """One network's checkpoint: its zoo quality (0: the only one), what it is and how to read it.

    ``url`` names it (the process cache's key; ``label`` is what messages and the set's
    identity show); ``read()`` returns the file's bytes or raises WeightsError naming it.
    """

    quality: int
    url: str
    read: Callable[[], bytes] = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return self.url.removeprefix(HUB_PREFIX)


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


def file_quality(zoo_name: str, filename: str, qualities: Sequence[int]) -> int:
    """The quality of a single checkpoint file by its name; 0 ("the one network") when it names none."""
    q = quality_in_name(zoo_name, filename) if qualities else None
    return q if q in qualities else 0


def pick_checkpoints(zoo_name: str, urls: Sequence[str], qualities: Sequence[int], weights: str) -> dict[int, str]:
    """Which of a folder's entries (``urls``) hold which quality of ``zoo_name``, by quality.

    ``qualities`` is what the zoo defines for this model (empty for a single-network VBR
    model). Raises WeightsError naming what was looked for in ``weights`` when nothing fits.
    """
    found: dict[int, str] = {}
    for url in sorted(urls):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if qualities:
            q = quality_in_name(zoo_name, name)
            if q in qualities:
                found.setdefault(q, url)
        elif name.startswith(zoo_name.removesuffix("-vbr")) and "vbr" in name and name.endswith(_CHECKPOINT_SUFFIXES):
            found.setdefault(0, url)
    if not found:
        want = (f"{zoo_name}-<quality>[-<hash>].pth.tar, quality in {min(qualities)}..{max(qualities)}"
                if qualities else f"{zoo_name.removesuffix('-vbr')}-mse-vbr-<hash>.pth.tar")
        raise WeightsError(f"no {zoo_name} checkpoint in {weights} (looked for {want})")
    return dict(sorted(found.items()))


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
