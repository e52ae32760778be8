"""Weights files for the learned codecs: safetensors with the model config in the metadata.

The file's SHA-256 is the weights identity written into every container, so a bitstream is
only ever decoded by the exact weights (and entropy tables) that wrote it. Codecs take the
file's bytes (``WeightsFile``); reading a URL (any fsspec one, with the storage layer's
retries) is ``ratefit.workers.codec_loader``'s job. Files are never unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = "ratefit-gained/1"


class WeightsError(ValueError):
    """A weights file is missing, unreadable or of the wrong kind; the message names it."""


# What a codec factory's ``weights_input`` says its ``weights`` option takes, so that the
# loader (``ratefit.workers.codec_loader``) knows what to turn a URL into.
FILE = "file"                 # one weights file: a WeightsFile
CHECKPOINTS = "checkpoints"   # CompressAI checkpoints: a list of zoo_weights.Source


@dataclass(frozen=True)
class WeightsFile:
    """A weights file's bytes and the name messages give it (its URL, or the bundled file's path)."""

    data: bytes = field(repr=False)
    name: str


def refuse_url(codec: str, weights: object) -> None:
    """Codecs never read storage: a ``weights`` URL must have been read before they are built."""
    if isinstance(weights, str) and weights:
        raise WeightsError(f"{codec}: weights given as a URL to the codec itself; codecs take the weights' "
                           f"bytes: build it with ratefit.workers.codec_loader.load_codec, which reads the URL")


def _bundled(filename: str):
    return resources.files("ratefit.codecs").joinpath("weights", filename)


def bundled_path(filename: str) -> str | None:
    """Path of a weights file shipped inside the package, or None when it is not there."""
    return str(_bundled(filename)) if _bundled(filename).is_file() else None


def bundled_weights(filename: str) -> WeightsFile | None:
    """A weights file shipped inside the package (package data, not storage), or None."""
    ref = _bundled(filename)
    return WeightsFile(ref.read_bytes(), str(ref)) if ref.is_file() else None


def parse_weights(weights: WeightsFile) -> tuple[dict[str, torch.Tensor], dict, bytes, dict[str, str]]:
    """A weights file's (tensors, config dict, SHA-256 of the file, metadata)."""
    url, data = weights.name, weights.data
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except Exception as e:
        raise WeightsError(f"{url} is not a safetensors weights file: {e}") from e
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{url}: weights format {meta.get('format')!r}, expected {FORMAT!r}")
    return tensors, json.loads(meta["config"]), hashlib.sha256(data).digest(), meta


def weights_bytes(state: dict[str, torch.Tensor], config: dict, extra: dict[str, str] | None = None) -> bytes:
    """Serialise a state dict with its config; transforms may be fp16, tables stay as they are."""
    meta = {"format": FORMAT, "config": json.dumps(config, sort_keys=True), **(extra or {})}
    return save_safetensors({k: v.contiguous() for k, v in state.items()}, metadata=meta)
