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

``bmshj2018-hyperprior`` (scale-only hyperprior) checkpoints keep the folded transforms and
fit a new hyper-analysis/synthesis for rate (see ``bmshj2018_hyperprior_state``).
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


KINDS = ("mbt2018-mean", "mbt2018-mean-vbr", "bmshj2018-hyperprior")


def export(model: GainedHyperprior, out_dir: str, kind: str = "mbt2018-mean", levels: list[int] | None = None,
           photos: list[str] | None = None, steps: int = 3000, log: Any = None) -> list[str]:
    """Write zoo-named checkpoints (``<name>-<quality>-<sha8>.pth.tar``) into ``out_dir``.

    Quality q is the gained model's level q - 1; ``levels`` picks some (default: all for
    ``mbt2018-mean``; required for the fitted ``bmshj2018-hyperprior``).
    """
    if levels is None and kind == "mbt2018-mean":
        levels = list(range(model.config.levels))
    os.makedirs(out_dir, exist_ok=True)
    if kind == "mbt2018-mean":
        blobs = {f"mbt2018-mean-{level + 1}": checkpoint_bytes(mbt2018_mean_state(model, level))
                 for level in levels or []}
    elif kind == "mbt2018-mean-vbr":
        blobs = {"mbt2018-mean-mse-vbr": checkpoint_bytes(mbt2018_mean_vbr_state(model))}
    elif kind == "bmshj2018-hyperprior":
        if not photos:
            raise ValueError("bmshj2018-hyperprior checkpoints are fitted: give photos to fit them on")
        blobs = {f"bmshj2018-hyperprior-{level + 1}": checkpoint_bytes(
            bmshj2018_hyperprior_state(model, level, photos, steps, log=log)) for level in (levels or [])}
    else:
        raise ValueError(f"export kind must be one of {', '.join(KINDS)}, got {kind!r}")
    paths = []
    for stem, data in blobs.items():
        path = os.path.join(out_dir, f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth.tar")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def bmshj2018_hyperprior_state(model: GainedHyperprior, level: int, photos: list[str], steps: int = 3000,
                               crop: int = 256, batch: int = 16, seed: int = 0,
                               log: Any = None) -> dict[str, Any]:
    """A ``bmshj2018-hyperprior`` state dict on ``model``'s transforms at ``level``.

    The scale-only hyperprior (``h_a`` on ``|y|``, ``h_s`` giving scales) has no
    counterpart in the gained model, so it is fitted here, for rate only: with ``g_a`` and
    ``g_s`` fixed (gains folded in), the latent and the decoder's distortion do not depend
    on the hyperprior, and minimising the bits of y and z is the whole problem. Latents of
    random crops of ``photos`` are computed once, then ``h_a``, ``h_s`` and the entropy
    bottleneck are trained on them (a minute or two on a CPU for the default steps).
    """
    import random

    import numpy as np
    from compressai.models import ScaleHyperprior
    from PIL import Image

    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = ScaleHyperprior(model.config.N, model.config.M)
    folded = _folded_state(model, level)
    net.load_state_dict({k: v for k, v in folded.items() if k.startswith(("g_a.", "g_s."))}, strict=False)
    latents = []
    with torch.no_grad():
        for path in photos:
            img = Image.open(path).convert("RGB")
            if min(img.size) < crop:
                continue
            x0, y0 = rng.randrange(img.width - crop + 1), rng.randrange(img.height - crop + 1)
            x = torch.from_numpy(np.asarray(img.crop((x0, y0, x0 + crop, y0 + crop)), dtype=np.float32) / 255.0)
            latents.append(net.g_a(x.permute(2, 0, 1)[None])[0])
    if len(latents) < batch:
        raise ValueError(f"need at least {batch} photos of {crop}px or more, got {len(latents)}")
    data = torch.stack(latents)
    fit = [p for n, p in net.named_parameters() if n.startswith(("h_a.", "h_s.", "entropy_bottleneck."))
           and not n.endswith(".quantiles")]
    opt = torch.optim.Adam(fit, lr=1e-3)
    aux = torch.optim.Adam([net.entropy_bottleneck.quantiles], lr=1e-3)
    net.train()
    for step in range(steps):
        y = data[torch.randint(len(data), (batch,))]
        z = net.h_a(torch.abs(y))
        z_hat, z_lik = net.entropy_bottleneck(z)
        _, y_lik = net.gaussian_conditional(y, net.h_s(z_hat))
        bits = -(torch.log2(y_lik).sum() + torch.log2(z_lik).sum()) / (batch * crop * crop)
        opt.zero_grad()
        bits.backward()
        opt.step()
        aux.zero_grad()
        net.aux_loss().backward()
        aux.step()
        if step == steps // 2:
            for g in opt.param_groups:
                g["lr"] = 1e-4
        if log is not None and step % 500 == 0:
            log(f"step {step}: {float(bits.detach()):.4f} bpp (rate of the latent at level {level})")
    net.eval()
    net.update(force=True)
    return net.state_dict()
