"""One training step of ``ratefit train``: the fast path that keeps an H100/H200 busy, and
the reference path it is measured and checked against (``train.py`` runs the chunk around it).

The reference loop (``train.py``) cuts crops on the CPU in a Python loop, copies them to the
GPU and runs the whole network in float32: about 1,100 crops/s of 256×256 on an H200, with
the GPU waiting on the host. The pieces here remove those waits:

* ``DeviceCrops``: every training photo decoded once into one flat uint8 buffer in device
  memory; crops, flips and rate levels are drawn on the device and cut with a single
  ``take`` (one gather for the whole batch, whatever the photos' sizes), straight into the
  ``channels_last`` layout the convolutions want.
* ``forward_mixed``: ``GainedHyperprior.forward``'s math step by step, with the four
  transforms' convolutions under bf16 autocast while GDN's normalisation, the gains and
  both entropy models run in float32 (likelihoods are differences of sigmoids/erfc of
  nearby values, which cancel in bf16; GDN's x² and rsqrt lose too much range/precision).
  The model stays a plain ``GainedHyperprior``: nothing is patched, its state dict is the
  one the weights file stores.
* ``EMA``: an exponential moving average of the weights; the exported weights are the EMA.
* ``make_optimizers``: fused Adam on CUDA (one kernel for all parameters), foreach on CPU.

None of these issue a host synchronisation per step, so the CPU queues work ahead of the GPU.
``make_batches``, ``make_loss`` and ``make_step`` assemble a step of either path.
"""

from __future__ import annotations

import copy
import random
from typing import Callable

import torch
import torch.nn as nn

from ratefit.codecs.gained import GDN, GainedHyperprior


class DeviceCrops:
    """Random crops with random flips from photos of any sizes, drawn on ``device``.

    The photos (uint8 CHW tensors) are concatenated in HWC order into one flat buffer; a
    batch is one gather whose index is built by broadcasting (photo base offset + row ×
    width × 3 + column × 3 + channel). Flips are folded into the row/column ramps, so they
    cost nothing. The result is a B×3×crop×crop uint8 view with ``channels_last`` strides.
    All random draws use this object's own generator (on the device), which a checkpoint
    saves and restores.
    """

    def __init__(self, images: list[torch.Tensor], crop: int, device: torch.device, seed: int = 0):
        small = [tuple(im.shape) for im in images if min(im.shape[1:]) < crop]
        if not images or small:
            raise ValueError(f"DeviceCrops needs photos of at least {crop}px on each side; got "
                             f"{len(images)} photos, too small: {small[:3]}")
        self.crop, self.device = crop, device
        hwc = [im.permute(1, 2, 0).reshape(-1) for im in images]   # a view when decoded as HWC
        sizes = torch.tensor([im.shape[1:] for im in images], dtype=torch.int64)
        lengths = sizes[:, 0] * sizes[:, 1] * 3
        self.flat = torch.cat(hwc).to(device)
        self.base = (torch.cumsum(lengths, 0) - lengths).to(device)
        self.height, self.width = sizes[:, 0].to(device), sizes[:, 1].to(device)
        self.ramp = torch.arange(crop, device=device)
        self.channel = torch.arange(3, device=device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @property
    def count(self) -> int:
        return int(self.base.numel())

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def draw(self, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B×3×crop×crop uint8 crops, what was drawn: photo index, top, left, flips)."""
        c, g, dev = self.crop, self.generator, self.device
        n = self.base.numel()
        u = torch.rand(batch, 5, device=dev, generator=g)
        index = (u[:, 0] * n).long().clamp_(max=n - 1)
        h, w = self.height[index], self.width[index]
        top = (u[:, 1] * (h - c + 1)).long().clamp_(max=h - c)   # clamp: float rounding at the top end
        left = (u[:, 2] * (w - c + 1)).long().clamp_(max=w - c)
        vflip, hflip = u[:, 3] < 0.5, u[:, 4] < 0.5
        rows = top[:, None] + torch.where(vflip[:, None], c - 1 - self.ramp, self.ramp)   # B×c
        cols = left[:, None] + torch.where(hflip[:, None], c - 1 - self.ramp, self.ramp)
        at = ((self.base[index][:, None] + rows * (w[:, None] * 3))[:, :, None, None]
              + (cols * 3)[:, None, :, None] + self.channel)                             # B×c×c×3
        crops = self.flat.take(at).permute(0, 3, 1, 2)   # channels_last view of the HWC gather
        return crops, {"index": index, "top": top, "left": left, "vflip": vflip, "hflip": hflip}

    def draw_levels(self, batch: int, levels: int) -> torch.Tensor:
        """One integer rate level per batch item (as float, the model's control value)."""
        return torch.randint(0, levels, (batch,), device=self.device, generator=self.generator).float()


def _run(seq: nn.Sequential, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """A transform layer by layer: convolutions under bf16 autocast, GDN in float32."""
    dev = x.device.type
    for layer in seq:
        if isinstance(layer, GDN):
            with torch.autocast(dev, enabled=False):
                x = layer(x.float())
        else:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                x = layer(x)
    return x.float()


def _bottleneck(eb: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``EntropyBottleneck.forward`` with its permutation as Python ints.

    CompressAI builds the permutation as a device tensor and unpacks it into ``permute``,
    which reads each element back to the host: two GPU synchronisations per step.
    """
    x = z.transpose(0, 1).contiguous()   # C×B×H×W
    shape = x.shape
    values = x.reshape(shape[0], 1, -1)
    outputs = eb.quantize(values, "noise" if eb.training else "dequantize", eb._get_medians())
    likelihood, _, _ = eb._likelihood(outputs)
    if eb.use_likelihood_bound:
        likelihood = eb.likelihood_lower_bound(likelihood)
    back = lambda t: t.reshape(shape).transpose(0, 1).contiguous()   # noqa: E731
    return back(outputs), back(likelihood)


def forward_mixed(model: GainedHyperprior, x: torch.Tensor, levels: torch.Tensor, bf16: bool = True) -> dict:
    """``GainedHyperprior.forward`` with the precision split (same math, same outputs' layout).

    Keep in step with ``gained.py``: ``tests/test_train.py`` checks that both give the same
    loss in float32, so a change there that is not made here fails a test.
    """
    g = model.gains(levels)
    y = _run(model.g_a, x, bf16)
    y_g = y * g["gain"]
    z_g = _run(model.h_a, y_g, bf16) * g["hgain"]
    z_hat_g, z_lik = _bottleneck(model.entropy_bottleneck, z_g)
    params = _run(model.h_s, z_hat_g * g["inv_hgain"], bf16)
    scales, means = params.chunk(2, 1)
    _, y_lik = model.gaussian_conditional(y_g, scales, means=means)
    y_hat_g = y_g + (torch.round(y_g - means) + means - y_g).detach()
    x_hat = _run(model.g_s, y_hat_g * g["inv_gain"], bf16)
    return {"x_hat": x_hat, "likelihoods": {"y": y_lik, "z": z_lik}}


def rd_terms(out: dict, x: torch.Tensor, levels: torch.Tensor, lambdas: torch.Tensor) -> dict:
    """Per-item λ·255²·MSE + bpp, averaged over the batch (CompressAI's convention)."""
    n_pixels = x.shape[2] * x.shape[3]
    bits = sum(torch.log2(lik).flatten(1).sum(1) for lik in out["likelihoods"].values())
    bpp = -bits / n_pixels
    mse = (out["x_hat"] - x).pow(2).flatten(1).mean(1)
    loss = (lambdas[levels.long()] * 255 ** 2 * mse + bpp).mean()
    return {"loss": loss, "bpp": bpp.mean(), "mse": mse.mean()}


class EMA:
    """Exponential moving average of a model's parameters: ``ema ← decay·ema + (1 − decay)·p``.

    Why: Adam's iterates jitter around the optimum at the scale of the learning rate; their
    average sits closer to it, so the shipped weights are the EMA's. It lives in its own
    ``GainedHyperprior`` (a deep copy), so exporting it is exporting a plain model. Buffers
    are not averaged: the model's are constant during training (CDF tables are built at export).
    """

    def __init__(self, model: GainedHyperprior, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._ema = list(self.model.parameters())
        self._src = list(model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._ema, self._src, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def make_optimizers(model: GainedHyperprior, path: str, lr: float, aux_lr: float, device: torch.device
                    ) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam on the network and a separate Adam on the entropy bottleneck's quantiles (aux loss).

    The fast path's are fused on CUDA (one kernel updates all parameters), foreach elsewhere;
    the reference loop keeps PyTorch's default Adam, as it always had.
    """
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    net = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    kind = {} if path == "reference" else {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(net, lr=lr, **kind), torch.optim.Adam(aux, lr=aux_lr, **kind)


# ------------------------------------------------------------------ one training step, both paths

def random_batch(images: list[torch.Tensor], batch: int, crop: int, rng: random.Random) -> torch.Tensor:
    """The reference path's crops: cut on the CPU, one Python iteration per item."""
    out = torch.empty(batch, 3, crop, crop, dtype=torch.uint8)
    for i in range(batch):
        im = images[rng.randrange(len(images))]
        _, h, w = im.shape
        top, left = rng.randrange(h - crop + 1), rng.randrange(w - crop + 1)
        c = im[:, top:top + crop, left:left + crop]
        if rng.random() < 0.5:
            c = c.flip(2)
        if rng.random() < 0.5:
            c = c.flip(1)
        out[i] = c
    return out


def rd_loss(model: GainedHyperprior, x: torch.Tensor, levels: torch.Tensor, lambdas: torch.Tensor) -> dict:
    """The reference loss: the model's own float32 forward, λ·255²·MSE + bpp averaged over the batch."""
    return rd_terms(model(x, levels), x, levels, lambdas)


Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def make_batches(path: str, images: list[torch.Tensor], batch: int, crop: int, levels: int, device: torch.device,
                 seed: int) -> tuple[Batches, random.Random, DeviceCrops | None]:
    """A function giving (x in [0, 1], levels) per call, and its RNG state to checkpoint
    (the Python RNG of the reference crops; the device sampler of the fast path)."""
    rng = random.Random(seed)
    if path == "reference":
        def ref() -> tuple[torch.Tensor, torch.Tensor]:
            x = random_batch(images, batch, crop, rng).to(device, non_blocking=True).float().div_(255)
            return x, torch.randint(0, levels, (batch,), device=device).float()
        return ref, rng, None
    crops = DeviceCrops(images, crop, device, seed)

    def fast() -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = crops.draw(batch)
        return x.float().div_(255), crops.draw_levels(batch, levels)
    return fast, rng, crops


def make_loss(path: str, model: GainedHyperprior, lambdas: torch.Tensor, bf16: bool, compile_: bool
              ) -> Callable[[torch.Tensor, torch.Tensor], dict]:
    """The loss of a batch on ``path``; the fast one optionally through ``torch.compile``."""
    if path == "reference":
        return lambda x, lv: rd_loss(model, x, lv, lambdas)
    fn = lambda x, lv: rd_terms(forward_mixed(model, x, lv, bf16), x, lv, lambdas)   # noqa: E731
    return torch.compile(fn) if compile_ else fn


def make_step(model: GainedHyperprior, opt: torch.optim.Optimizer, aux_opt: torch.optim.Optimizer,
              ema: EMA | None, batches: Callable, loss_fn: Callable, clip: float) -> Callable[[float], dict]:
    """One update at learning rate ``lr`` (network, then aux quantiles, then EMA); it returns
    the losses as device tensors, so a step never waits for the device."""
    net = [p for g in opt.param_groups for p in g["params"]]

    def step(lr: float) -> dict:
        for g in opt.param_groups:
            g["lr"] = lr
        x, levels = batches()
        r = loss_fn(x, levels)
        opt.zero_grad(set_to_none=True)
        r["loss"].backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(net, clip)
        opt.step()
        aux = model.aux_loss()
        aux_opt.zero_grad(set_to_none=True)
        aux.backward()
        aux_opt.step()
        if ema is not None:
            ema.update()
        return {"loss": r["loss"].detach(), "bpp": r["bpp"].detach(), "mse": r["mse"].detach(),
                "aux": aux.detach(), "crops": x.shape[0]}
    return step


def prepare_model(model: GainedHyperprior, path: str, device: torch.device) -> GainedHyperprior:
    """``model`` on ``device``, in ``channels_last`` for the fast path (the crops come so)."""
    model = model.to(device)
    if path == "fast":
        model = model.to(memory_format=torch.channels_last)
    return model
