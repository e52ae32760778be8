"""Weights files for the learned codecs: safetensors with the model config in the metadata.

The file's SHA-256 is the weights identity written into every container, so a bitstream is
only ever decoded by the exact weights (and entropy tables) that wrote it. Files load from
any fsspec URL and are never unpickled.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = "ratefit-gained/1"


class WeightsError(ValueError):
    """A weights file is missing, unreadable or of the wrong kind; the message names it."""


def bundled_path(filename: str) -> str | None:
    """Path of a weights file shipped inside the package, or None when it is not there."""
    ref = resources.files("ratefit.codecs").joinpath("weights", filename)
    return str(ref) if ref.is_file() else None


def read_weights(url: str, storage_options: dict[str, Any] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict, bytes, dict[str, str]]:
    """Read a weights file; returns (tensors, config dict, SHA-256 of the file, metadata)."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read weights {url}: {e}") from e
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
