"""ratefit's gained model written out as CompressAI zoo checkpoints.

The default model (``gained.py``) is Minnen et al.'s mean-scale hyperprior plus gain
vectors, i.e. CompressAI's ``MeanScaleHyperprior`` (``mbt2018-mean``) with the same layer
names. At an integer level the gains are constants per channel, so they fold into the
neighbouring convolutions: the gain into ``g_a``'s last layer, the hyper-gain into
``h_a``'s last, the inverse gains into the first layers of ``h_s`` and ``g_s``. The result
is, per level, an exact ``mbt2018-mean`` network in the zoo's checkpoint format: usable by
CompressAI itself, and by ratefit's ``compressai:mbt2018-mean`` codec (which is how its
tests and the Kodak runs of the zoo codecs get trained networks without a download).

``mbt2018-mean-vbr`` checkpoints are made the same way from the middle level, with the
VBR model's scalar gains set to the mean per-channel gain ratio of the other levels and
its learned reconstruction offsets zero: an approximation of the gained model (whose gains
are per channel), good near the middle level and falling off towards the ends.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import torch

from ratefit.codecs.gained import GainedHyperprior


def _folded_state(model: GainedHyperprior, level: float) -> dict[str, torch.Tensor]:
    g = {k: v.flatten() for k, v in model.gains(torch.tensor([float(level)])).items()}
    state = {k: v.detach().float().clone() if v.is_floating_point() else v.clone()
             for k, v in model.state_dict().items() if not k.startswith("log_")}
    state["g_a.6.weight"] *= g["gain"][:, None, None, None]
    state["g_a.6.bias"] *= g["gain"]
    state["h_a.4.weight"] *= g["hgain"][:, None, None, None]
    state["h_a.4.bias"] *= g["hgain"]
    state["h_s.0.weight"] *= g["inv_hgain"][:, None, None, None]   # ConvTranspose2d: [in, out, k, k]
    state["g_s.0.weight"] *= g["inv_gain"][:, None, None, None]
    return state


def mbt2018_mean_state(model: GainedHyperprior, level: int) -> dict[str, Any]:
    """An ``mbt2018-mean`` state dict equal to ``model`` at ``level`` (tables rebuilt on CPU)."""
    from compressai.models import MeanScaleHyperprior

    net = MeanScaleHyperprior(model.config.N, model.config.M)
    net.load_state_dict(_folded_state(model, level))
    net.update(force=True)
    return net.state_dict()


def mbt2018_mean_vbr_state(model: GainedHyperprior) -> dict[str, Any]:
    """A ``mbt2018-mean-vbr`` state dict approximating ``model`` (see the module docstring)."""
    from compressai.models import MeanScaleHyperpriorVbr

    levels = model.config.levels
    middle = (levels - 1) // 2
    net = MeanScaleHyperpriorVbr(model.config.N, model.config.M)
    state = net.state_dict()
    state.update(_folded_state(model, middle))
    log_gain = model.log_gain.detach().float()
    ratios = torch.exp((log_gain - log_gain[middle]).mean(dim=1))   # one scalar gain per level
    picks = torch.linspace(0, levels - 1, len(net.Gain)).round().long()
    state["Gain"] = ratios[picks]
    for k in [k for k in state if k.startswith("QuantABCD.")]:
        state[k] = torch.zeros_like(state[k])    # no reconstruction offsets: plain rounding
    net.load_state_dict(state)
    net.update(force=True)
    return net.state_dict()


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def export(model: GainedHyperprior, out_dir: str, kind: str = "mbt2018-mean") -> list[str]:
    """Write zoo-named checkpoints (``<name>-<quality>-<sha8>.pth.tar``) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    if kind == "mbt2018-mean":
        blobs = {f"mbt2018-mean-{level + 1}": checkpoint_bytes(mbt2018_mean_state(model, level))
                 for level in range(model.config.levels)}
    elif kind == "mbt2018-mean-vbr":
        blobs = {"mbt2018-mean-mse-vbr": checkpoint_bytes(mbt2018_mean_vbr_state(model))}
    else:
        raise ValueError(f"export kind must be mbt2018-mean or mbt2018-mean-vbr, got {kind!r}")
    paths = []
    for stem, data in blobs.items():
        path = os.path.join(out_dir, f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth.tar")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths
