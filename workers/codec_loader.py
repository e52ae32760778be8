"""Building a codec from a job's options, with its weights read through the storage layer.

Codecs never open a URL: the gain-hyperprior family takes its weights file's bytes (a
``WeightsFile``), CompressAI's zoo codecs a list of ``Source`` objects whose ``read()``
returns a checkpoint's bytes (``codecs/weights.py``, ``codecs/zoo_weights.py``). A codec
factory says which with its ``weights_input``. This module turns the user-facing options
into those: a ``weights`` URL (a file or, for the zoo, a folder; local, ``s3://``,
``https://``; with the job's ``storage_options``) is read through ``storage.py``, so an
outage is ridden out and then raises StorageUnavailable like every other read, and
``weights: zoo`` is looked up in (and downloaded once into) torch.hub's cache. Codecs whose
factory says nothing (classical ones, plugins) get their options as they are.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Sequence

from ratefit.codecs.base import Codec
from ratefit.codecs.registry import factory_of, get_codec
from ratefit.codecs.weights import CHECKPOINTS, FILE, WeightsError, WeightsFile, parse_weights
from ratefit.codecs.zoo_weights import HUB_PREFIX, ZOO_WEIGHTS, Source, file_quality, pick_checkpoints, zoo_urls
from ratefit.workers.storage import fetch, full_url, open_fs, with_retries


def load_codec(name: str, **options: Any) -> Codec:
    """``registry.get_codec(name, **options)`` with the weights options resolved (``resolve_options``)."""
    return get_codec(name, **resolve_options(name, options))


def resolve_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as codec ``name`` takes them: a ``weights`` URL read, ``storage_options`` used up.

    Raises KeyError for an unknown codec (as get_codec does), WeightsError when the weights
    are missing or unreadable, StorageUnavailable when their store does not answer.
    """
    factory = factory_of(name)
    kind = getattr(factory, "weights_input", None)
    if kind not in (FILE, CHECKPOINTS):
        return dict(options)
    opts = dict(options)
    storage_options = opts.pop("storage_options", None)
    weights = opts.get("weights")
    if isinstance(weights, str) and weights:
        if kind == FILE:
            opts["weights"] = read_weights_file(weights, storage_options)
        else:
            opts["weights"] = zoo_sources(factory.zoo_name, weights, factory.qualities, storage_options)
    return opts


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """A weights file's bytes, through short outages; WeightsError naming ``url`` when it cannot be read."""
    try:
        return fetch(*open_fs(url, storage_options))
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read weights {url}: {e}") from e


def read_weights_file(url: str, storage_options: dict[str, Any] | None = None) -> WeightsFile:
    """The gain-hyperprior weights file at ``url``, for ``load_model`` or the codec's ``weights``."""
    return WeightsFile(read_bytes(url, storage_options), url)


def read_weights(url: str, storage_options: dict[str, Any] | None = None
                 ) -> tuple[dict[str, Any], dict, bytes, dict[str, str]]:
    """The weights file at ``url`` parsed: (tensors, config dict, SHA-256 of the file, metadata)."""
    return parse_weights(read_weights_file(url, storage_options))


def zoo_sources(zoo_name: str, weights: str, qualities: Sequence[int],
                storage_options: dict[str, Any] | None = None) -> list[Source]:
    """The networks ``weights`` (a checkpoint, a folder of them, or ``zoo``) offers, sorted by quality.

    Nothing is read yet: each Source reads its file when the codec first needs that network.
    """
    if weights == ZOO_WEIGHTS:
        return [Source(q, HUB_PREFIX + url, functools.partial(_read_through_hub_cache, url))
                for q, url in sorted(zoo_urls(zoo_name).items())]
    try:
        fs, path = open_fs(weights, storage_options)
        is_dir = with_retries(lambda: fs.isdir(path), f"list {weights}")
        names = with_retries(lambda: fs.ls(path, detail=False), f"list {weights}") if is_dir else []
        exists = is_dir or with_retries(lambda: fs.exists(path), f"stat {weights}")
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read weights {weights}: {e}") from e
    if not is_dir:
        if not exists:
            raise WeightsError(f"weights {weights} do not exist")
        quality = file_quality(zoo_name, path.rsplit("/", 1)[-1], qualities)
        return [Source(quality, weights, functools.partial(read_bytes, weights, storage_options))]
    picked = pick_checkpoints(zoo_name, [full_url(fs, p) for p in names], qualities, weights)
    return [Source(q, url, functools.partial(read_bytes, url, storage_options)) for q, url in picked.items()]


def _read_through_hub_cache(url: str) -> bytes:
    """A zoo checkpoint from torch.hub's cache (``$TORCH_HOME``), downloaded there first if missing."""
    import torch

    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        m = re.search(r"-([a-f0-9]+)\.", os.path.basename(url))
        try:
            torch.hub.download_url_to_file(url, path, hash_prefix=m.group(1) if m else None, progress=False)
        except Exception as e:
            raise WeightsError(f"cannot download {url} into torch.hub's cache ({path}): {e}. "
                               "Without network access, pass --weights FILE_OR_FOLDER instead") from e
    return read_bytes(path)
