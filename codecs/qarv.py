"""``qarv``: QARV (Duan et al., "QARV: Quantization-Aware ResNet VAE for Lossy Image
Compression", TPAMI 2023) as a ratefit codec, written here from the paper's design.

A hierarchical (ResNet) VAE: a bottom-up encoder leaves features at strides 8…64, and a
top-down decoder draws one latent group after another from coarse to fine, each with a
Gaussian prior computed from everything decoded so far and a posterior that also sees the
encoder's feature at its stride. Every block is a ConvNeXt block whose LayerNorm is shifted
and scaled by an embedding of λ (AdaLN), so one network covers λ ∈ [16, 2048] (0.2–2.2 bpp
on Kodak for the published ``qarv_base``) continuously. Latents are quantised around the
prior mean (``round(q - μ) + μ``: "quantisation-aware"), and entropy coded with CompressAI's
``GaussianConditional`` (64 scales from 0.11 to 20, rANS).

Module structure and parameter names are those of the published ``qarv_base`` checkpoint
(``{"model": state_dict}``, loaded with ``torch.load(weights_only=True)``), so ``--weights
qarv_base.pt`` runs it; a checkpoint of another shape is refused naming what differs.
Checkpoints ratefit writes (``checkpoint_bytes``) add ``"ratefit_config"`` for other sizes.

Rate control: the value is ln λ over the model's range (higher = more bits). Because the
encoder is λ-conditioned too, each price is a full analysis at that λ; ``estimate`` prices
the quantised latents at the coder's own table scales without entropy coding, and the last
analysis is kept, so the real encode after the search costs only the rANS pass.

Payload: ``u8 kind`` (device kind 0 cpu / 1 cuda, plus 2 when the prior path ran in float64)
+ ``u8 n`` + ``n × u32`` string lengths + the ``n`` latent strings, coarse first (the
published code's packing of the strings). Every latent's distribution comes from the decoder
network, so a stream decodes only where that network computes the numbers the encoder did.
By default (``precision="float64"``) the layers that decide the coder's parameters run in
float64, so float32 rounding (which moves with a convolution's thread count) cannot move a
scale index; ``precision="float32"`` codes exactly like the authors' code (byte-identical
streams) and decodes exactly only with the same device kind and thread count; a decoder
follows the precision its stream names (a twin network is built for the other one on first
need), so restoring takes no option. Decoding on
another device kind is refused until CPU↔GPU decoding is measured (see README, "QARV").
``decode_progressive`` decodes only the first K groups and takes the prior mean for the rest:
a coarser picture from the same stream.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import struct
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.entropy_models import EntropyModel, GaussianConditional
from compressai.ops import LowerBound

from ratefit.codecs.base import Capabilities, CodecError, ControlRange
from ratefit.codecs.weights import FILE, WeightsError, WeightsFile, refuse_url

NAME = "qarv"
MAX_LMB = 8192.0          # λ's embedding is scaled by ln λ / ln MAX_LMB (part of the trained model)
DEVICE_KINDS = ("cpu", "cuda")
_COUNT = struct.Struct("<B")
_LENGTH = struct.Struct("<I")
_FLOAT64 = 0x02          # payload byte 0: device kind, plus this bit when the prior path ran in float64
PRECISIONS = ("float64", "float32")
# Entropy-model buffers rebuilt on load from the fixed scale table (present or not, filled
# or empty in a published checkpoint, depending on when it was saved).
_TABLE_BUFFERS = ("_offset", "_quantized_cdf", "_cdf_length", "lower_bound_scale.bound",
                  "likelihood_lower_bound.bound")


# ------------------------------------------------------------------------------ configuration

@dataclass(frozen=True)
class QarvConfig:
    """The shape of a QARV network; the defaults are the published ``qarv_base``.

    ``n = len(enc_dims)`` encoder stages run at strides 4, 8, … 4·2^(n-1); stages 1… leave a
    feature for the latent group of their stride. The decoder has one stage per latent
    stride, coarse first, then ``final_depth`` blocks at stride 4 and a ×4 upsampling.
    """

    enc_dims: tuple[int, ...] = (192, 384, 512, 512, 512)
    enc_depths: tuple[int, ...] = (6, 6, 6, 4, 4)
    enc_kernels: tuple[int, ...] = (7, 7, 5, 3, 1)
    dec_dims: tuple[int, ...] = (512, 512, 384, 256, 128)
    z_dims: tuple[int, ...] = (32, 32, 96, 8)          # coarse first
    latents: tuple[int, ...] = (1, 2, 3, 3)            # latent blocks per decoder stage
    dec_kernels: tuple[int, ...] = (1, 3, 5, 7)
    dec_mlp_ratios: tuple[float, ...] = (4.0, 3.0, 2.0, 1.75)
    final_depth: int = 8
    final_kernel: int = 7
    final_mlp_ratio: float = 1.5
    embed_dim: int = 256
    sin_dim: int = 256
    sin_period: float = 64.0
    lmb_low: float = 16.0
    lmb_high: float = 2048.0
    im_shift: float = -0.4546259594901961
    im_scale: float = 3.67572653978347

    def __post_init__(self) -> None:
        n = len(self.enc_dims)
        if n < 2 or not (len(self.enc_depths) == len(self.enc_kernels) == len(self.dec_dims) == n):
            raise WeightsError(f"qarv config: enc_dims, enc_depths, enc_kernels and dec_dims need one entry per "
                               f"encoder stage (at least 2), got {self}")
        if not (len(self.z_dims) == len(self.latents) == len(self.dec_kernels) == len(self.dec_mlp_ratios) == n - 1):
            raise WeightsError(f"qarv config: z_dims, latents, dec_kernels and dec_mlp_ratios need one entry per "
                               f"latent stride ({n - 1}), got {self}")
        if not 0 < self.lmb_low < self.lmb_high:
            raise WeightsError(f"qarv config: λ range {self.lmb_low}..{self.lmb_high} is empty")

    @property
    def max_stride(self) -> int:
        return 4 * 2 ** (len(self.enc_dims) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QarvConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise WeightsError(f"qarv config has unknown fields {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


# A small network of the same design, for tests and quick experiments (trains on a CPU). Its
# λ range sits low (0.1..32, where rate is cheap to trade): a few hundred steps then give it a
# rate range of 3-5x that rises with λ; at 16..2048 the same training left the rate flat in λ
# (measured: within 1% on a sample photo), the λ conditioning not yet learned.
SMALL = QarvConfig(enc_dims=(32, 48, 64), enc_depths=(1, 1, 1), enc_kernels=(7, 5, 3), dec_dims=(64, 48, 32),
                   z_dims=(8, 8), latents=(1, 1), dec_kernels=(3, 5), dec_mlp_ratios=(2.0, 2.0), final_depth=1,
                   embed_dim=32, sin_dim=32, lmb_low=0.1, lmb_high=32.0)


# ------------------------------------------------------------------------------------ layers

def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 0)
    nn.init.zeros_(conv.bias)
    return conv


def _upsample(cin: int, cout: int, rate: int = 2) -> nn.Sequential:
    """A 1×1 convolution to ``rate²`` times the channels, then a pixel shuffle."""
    return nn.Sequential(_conv(cin, cout * rate * rate, 1), nn.PixelShuffle(rate))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNBlock(nn.Module):
    """A residual ConvNeXt block whose LayerNorm is shifted and scaled by the λ embedding."""

    requires_embedding = True

    def __init__(self, dim: int, embed_dim: int, kernel_size: int = 7, mlp_ratio: float = 2.0):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.embedding_layer = nn.Sequential(nn.GELU(), nn.Linear(embed_dim, 2 * dim),
                                             nn.Unflatten(1, (1, 1, 2 * dim)))
        self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.gamma = nn.Parameter(torch.full((1, dim, 1, 1), 1e-6))   # layer scale: blocks start near identity

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm(self.conv_dw(x).permute(0, 2, 3, 1).contiguous())
        shift, scale = torch.chunk(self.embedding_layer(emb), 2, dim=-1)
        x = self.mlp(x * (1 + scale) + shift).permute(0, 3, 1, 2).contiguous()
        return x.mul(self.gamma) + shortcut


class Mark(nn.Module):
    """Keeps the encoder's feature here for the latent group of its stride (no parameters)."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Stop(nn.Module):
    """After the last latent block: encoding need not run the decoder further (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DiscreteGaussian(GaussianConditional):
    """CompressAI's Gaussian conditional with QARV's fixed table of 64 scales in [0.11, 20].

    The table is a constant of the format, not a weight (a non-persistent buffer), and the
    CDF tables are built from it on the CPU when a model loads (``update``), so every
    machine codes with the same integers.
    """

    def __init__(self) -> None:
        EntropyModel.__init__(self)   # GaussianConditional's own init registers a persistent table
        table = torch.exp(torch.linspace(math.log(0.11), math.log(20.0), steps=64))
        self.register_buffer("scale_table", table, persistent=False)
        self.tail_mass = 1e-9
        self.lower_bound_scale = LowerBound(float(table[0]))

    def _standardized_cumulative(self, inputs: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1 + torch.erf(inputs / math.sqrt(2)))   # the standard normal's CDF, as QARV's tables

    def coded_scales(self, indexes: torch.Tensor) -> torch.Tensor:
        """The scales the coder's tables hold for ``indexes`` (what the rANS pass pays)."""
        return self.scale_table.to(indexes.device)[indexes.long()]


class LatentBlock(nn.Module):
    """One latent group: prior p(z | z<), posterior q(z | z<, x), and z merged into the feature."""

    is_latent_block = True

    def __init__(self, width: int, zdim: int, enc_key: str, enc_width: int, embed_dim: int, kernel_size: int,
                 mlp_ratio: float):
        super().__init__()
        self.enc_key = enc_key
        self.resnet_front = AdaLNBlock(width, embed_dim, kernel_size, mlp_ratio)
        self.resnet_end = AdaLNBlock(width, embed_dim, kernel_size, mlp_ratio)
        self.posterior0 = AdaLNBlock(enc_width, embed_dim, kernel_size)
        self.posterior1 = AdaLNBlock(width, embed_dim, kernel_size)
        self.posterior2 = AdaLNBlock(width, embed_dim, kernel_size)
        self.post_merge = _conv(width + enc_width, width, 1)
        self.posterior = _conv(width, zdim, 3)
        self.z_proj = _conv(zdim, width, 1)
        self.prior = _conv(width, 2 * zdim, 1)
        self.discrete_gaussian = DiscreteGaussian()

    def prior_of(self, feature: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feature, mean, scale) of the prior; log-scales are kept above -2.3 by a softplus."""
        feature = self.resnet_front(feature, emb)
        mean, logv = self.prior(feature).chunk(2, dim=1)
        return feature, mean, torch.exp(F.softplus(logv + 2.3) - 2.3)

    def posterior_of(self, feature: torch.Tensor, enc: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        merged = torch.cat([self.posterior1(feature, emb), self.posterior0(enc, emb)], dim=1)
        return self.posterior(self.posterior2(self.post_merge(merged), emb))

    def merge(self, feature: torch.Tensor, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.resnet_end(feature + self.z_proj(z), emb)


class Encoder(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.enc_blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {}
        for block in self.enc_blocks:
            if isinstance(block, Mark):
                features[block.key] = x
            elif getattr(block, "requires_embedding", False):
                x = block(x, emb)
            else:
                x = block(x)
        return features


def _encoder_blocks(c: QarvConfig) -> list[nn.Module]:
    n, e = len(c.enc_dims), c.enc_dims
    blocks: list[nn.Module] = [_conv(3, e[0], 4, stride=4)]
    for i in range(n):
        blocks += [AdaLNBlock(e[i], c.embed_dim, c.enc_kernels[i]) for _ in range(c.enc_depths[i])]
        if i > 0:
            blocks.append(Mark(f"enc_s{4 * 2 ** i}"))
        if i < n - 1:
            blocks += [AdaLNBlock(e[i], c.embed_dim), _conv(e[i], e[i + 1], 2, stride=2)]
    return blocks


def _decoder_blocks(c: QarvConfig) -> list[nn.Module]:
    n, d, e = len(c.enc_dims), c.dec_dims, c.enc_dims
    blocks: list[nn.Module] = []
    for j in range(n - 1):   # coarse first: stride 4·2^(n-1-j)
        k, r = c.dec_kernels[j], c.dec_mlp_ratios[j]
        if j > 0:
            blocks.append(AdaLNBlock(d[j], c.embed_dim, k, r))
        blocks += [LatentBlock(d[j], c.z_dims[j], f"enc_s{4 * 2 ** (n - 1 - j)}", e[n - 1 - j], c.embed_dim, k, r)
                   for _ in range(c.latents[j])]
        if j == n - 2:
            blocks.append(Stop())
        blocks += [AdaLNBlock(d[j], c.embed_dim, k, r), _upsample(d[j], d[j + 1])]
    blocks += [AdaLNBlock(d[-1], c.embed_dim, c.final_kernel, c.final_mlp_ratio) for _ in range(c.final_depth)]
    blocks.append(_upsample(d[-1], 3, rate=4))
    return blocks


# ------------------------------------------------------------------------------------- model

@dataclass
class Analysis:
    """One image analysed at one λ: what the coder needs and what the decoder would rebuild."""

    qm: list[torch.Tensor]        # posterior means, per latent block
    means: list[torch.Tensor]     # prior means
    indexes: list[torch.Tensor]   # the coder's scale indexes
    bits: float                   # -log2 of the quantised latents' probabilities at the coded scales
    feature: torch.Tensor         # the decoder's feature after the last latent block
    stop: int                     # index of the Stop block in dec_blocks


class Qarv(nn.Module):
    def __init__(self, config: QarvConfig = QarvConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(_encoder_blocks(config))
        self.dec_blocks = nn.ModuleList(_decoder_blocks(config))
        self.bias = nn.Parameter(torch.zeros(1, config.dec_dims[0], 1, 1))
        self.lmb_embedding = nn.Sequential(nn.Linear(config.sin_dim, config.embed_dim), nn.GELU(),
                                           nn.Linear(config.embed_dim, config.embed_dim))
        self.latent_blocks = [b for b in self.dec_blocks if isinstance(b, LatentBlock)]
        self.stop = next(i for i, b in enumerate(self.dec_blocks) if isinstance(b, Stop))

    @property
    def num_latents(self) -> int:
        return len(self.latent_blocks)

    def float64_prior(self) -> "Qarv":
        """Run λ's embedding and the top-down path up to the last latent block in float64.

        Those layers decide every latent's coder parameters on both sides; in float32 their
        rounding depends on how a convolution splits its sums (thread count, kernel choice),
        and one scale index that lands in the neighbouring bucket desynchronises the rest of
        the stream (measured: a sample photo's stream decoded 0.4 dB off under another thread
        count). The encoder and the synthesis after the last latent only shape pixels and stay
        float32. Streams are then no longer bit-identical to the authors' float32 code.
        """
        return self.prior_in(torch.float64)

    def prior_in(self, dtype: torch.dtype) -> "Qarv":
        """The prior path (see ``float64_prior``) in ``dtype``; back to float32 is exact, since
        the float64 weights are float32 ones widened."""
        for block in self.dec_blocks[:self.stop + 1]:
            block.to(dtype)
        self.lmb_embedding.to(dtype)
        self.bias.data = self.bias.data.to(dtype)
        return self

    def symbols_per_group(self, h: int, w: int) -> list[int]:
        """How many symbols each latent group codes for a padded ``h`` x ``w`` image."""
        c, out = self.config, []
        for j, (zdim, count) in enumerate(zip(c.z_dims, c.latents)):
            stride = c.max_stride // 2 ** j
            out += [zdim * (h // stride) * (w // stride)] * count
        return out

    def update_tables(self) -> None:
        """The coders' CDF tables, built on the CPU from the fixed scale table."""
        for b in self.latent_blocks:
            dg = b.discrete_gaussian
            device = dg.scale_table.device
            dg.to("cpu").update()
            dg.to(device)

    def embedding(self, lmb: torch.Tensor) -> torch.Tensor:
        """λ (one per image) → the vector every AdaLN block is conditioned on."""
        values = torch.log(lmb) * self.config.sin_period / math.log(MAX_LMB)
        half = self.config.sin_dim // 2
        exponents = torch.linspace(0, 1, steps=half, dtype=values.dtype, device=values.device)
        freqs = torch.pow(self.config.sin_period, -exponents)
        args = values.view(-1, 1) * freqs.view(1, half)
        return self.lmb_embedding(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

    def lmb_tensor(self, lmb: float, n: int = 1) -> torch.Tensor:
        return torch.full((n,), float(lmb), device=self.bias.device, dtype=self.bias.dtype)

    def _input(self, im: torch.Tensor) -> torch.Tensor:
        return (im + self.config.im_shift) * self.config.im_scale

    def _run(self, block: nn.Module, feature: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return block(feature, emb) if getattr(block, "requires_embedding", False) else block(feature)

    def start(self, n: int, h: int, w: int) -> torch.Tensor:
        """The decoder's constant start (``h``, ``w``: the padded image size)."""
        s = self.config.max_stride
        return self.bias.expand(n, -1, h // s, w // s)

    def analyse(self, im: torch.Tensor, lmb: float) -> Analysis:
        """Encoder and top-down path up to the last latent block, as the coder runs them."""
        emb = self.embedding(self.lmb_tensor(lmb, im.shape[0]))
        enc = self.encoder(self._input(im), emb.float())
        feature = self.start(im.shape[0], im.shape[2], im.shape[3])
        qms, means, idxs, bits = [], [], [], 0.0
        for block in self.dec_blocks[:self.stop]:
            if not isinstance(block, LatentBlock):
                feature = self._run(block, feature, emb)
                continue
            feature, pm, pv = block.prior_of(feature, emb)
            qm = block.posterior_of(feature, enc[block.enc_key].to(feature.dtype), emb)
            dg = block.discrete_gaussian
            indexes = dg.build_indexes(pv)
            z = dg.quantize(qm, "dequantize", means=pm)
            lik = dg._likelihood(z, dg.coded_scales(indexes), means=pm).clamp_min(1e-9)
            bits += float(-torch.log2(lik.double()).sum())
            qms.append(qm), means.append(pm), idxs.append(indexes)
            feature = block.merge(feature, z, emb)
        return Analysis(qms, means, idxs, bits, feature, self.stop)

    def finish(self, feature: torch.Tensor, lmb: float, start: int | None = None) -> torch.Tensor:
        """The decoder from ``start`` (default: after the last latent block) to the picture in [0, 1]."""
        emb = self.embedding(self.lmb_tensor(lmb, feature.shape[0])).float()
        feature = feature.float()
        for block in self.dec_blocks[(self.stop + 1) if start is None else start:]:
            feature = self._run(block, feature, emb)
        return feature.clamp(-1.0, 1.0).mul(0.5).add(0.5)

    def compress(self, a: Analysis) -> list[bytes]:
        return [b.discrete_gaussian.compress(qm, idx, means=pm)[0]
                for b, qm, idx, pm in zip(self.latent_blocks, a.qm, a.indexes, a.means)]

    def decompress(self, strings: list[bytes], lmb: float, h: int, w: int, groups: int | None = None) -> torch.Tensor:
        """The picture from the first ``groups`` latent strings (default: all); later groups take
        their prior mean (the coarse-to-fine preview)."""
        groups = self.num_latents if groups is None else groups
        emb = self.embedding(self.lmb_tensor(lmb))
        feature = self.start(1, h, w)
        i = 0
        for block in self.dec_blocks[:self.stop]:
            if not isinstance(block, LatentBlock):
                feature = self._run(block, feature, emb)
                continue
            feature, pm, pv = block.prior_of(feature, emb)
            if i < groups:
                dg = block.discrete_gaussian
                z = dg.decompress([strings[i]], dg.build_indexes(pv), dtype=pm.dtype, means=pm)
            else:
                z = pm
            feature = block.merge(feature, z, emb)
            i += 1
        return self.finish(feature, lmb)

    def loss(self, im: torch.Tensor, lmb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training objective (rate in nats per dimension + λ·MSE on [-1, 1], over λ), additive-noise
        latents; returns (loss, bpp, mse) averaged over the batch."""
        emb = self.embedding(lmb)
        enc = self.encoder(self._input(im), emb)
        feature = self.start(im.shape[0], im.shape[2], im.shape[3])
        nats = torch.zeros(im.shape[0], device=im.device)
        for block in self.dec_blocks:
            if not isinstance(block, LatentBlock):
                feature = self._run(block, feature, emb)
                continue
            feature, pm, pv = block.prior_of(feature, emb)
            qm = block.posterior_of(feature, enc[block.enc_key], emb)
            z = qm + torch.empty_like(qm).uniform_(-0.5, 0.5)
            normal = torch.distributions.Normal(pm, pv)
            mass = normal.cdf(z + 0.5) - normal.cdf(z - 0.5)
            nats = nats - torch.log(mass.clamp_min(1e-9)).sum(dim=(1, 2, 3))
            feature = block.merge(feature, z, emb)
        mse = F.mse_loss(feature, im * 2 - 1, reduction="none").mean(dim=(1, 2, 3))
        ndims = im[0].numel()
        # Each image's R + λD divided by its λ: the same optimum per λ, but images at low λ
        # are not drowned by those at high λ (a small network learns λ's effect on the rate
        # in hundreds of steps instead of never).
        loss = ((nats / ndims + lmb * mse) / lmb).mean()
        return loss, (nats / (ndims / 3) / math.log(2)).mean().detach(), mse.mean().detach()


# ------------------------------------------------------------------------------ checkpoints

def _is_table_buffer(key: str) -> bool:
    return ".discrete_gaussian." in key and key.split(".discrete_gaussian.", 1)[1] in _TABLE_BUFFERS


def load_checkpoint(data: bytes, name: str) -> tuple[Qarv, dict[str, Any]]:
    """The model in a QARV checkpoint (``{"model": state_dict}``, or a bare state dict) on the CPU.

    Raises WeightsError naming the file and, for a checkpoint of another shape, which
    parameters are missing, unexpected or of other sizes.
    """
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{name}: not a checkpoint torch.load(weights_only=True) reads: {e}") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"{name}: a QARV checkpoint is a dict, got {type(obj).__name__}")
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{name}: no state dict of tensors under 'model'")
    config = QarvConfig.from_dict(obj["ratefit_config"]) if isinstance(obj.get("ratefit_config"), dict) else QarvConfig()
    model = Qarv(config)
    expected = {k: v for k, v in model.state_dict().items() if not _is_table_buffer(k)}
    given = {k: v for k, v in state.items() if not _is_table_buffer(k)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(f"{k} {tuple(given[k].shape)} (model: {tuple(v.shape)})"
                    for k, v in expected.items() if k in given and given[k].shape != v.shape)
    if missing or unexpected or shapes:
        what = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes)) if keys]
        kind = "the published qarv_base" if "ratefit_config" not in obj else "its ratefit_config"
        raise WeightsError(f"{name}: this checkpoint does not fit the QARV network of {kind}; " + "; ".join(what))
    model.load_state_dict(given, strict=False)
    model.update_tables()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {k: v for k, v in obj.items() if k not in ("model", "ratefit_config")}


def checkpoint_bytes(model: Qarv, published_layout: bool = False) -> bytes:
    """A checkpoint of ``model``: ``{"model": state_dict}`` as published, plus the config
    (``"ratefit_config"``) unless ``published_layout`` (then it must be a ``qarv_base``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    obj: dict[str, Any] = {"model": state}
    if not published_layout:
        obj["ratefit_config"] = model.config.to_dict()
    elif model.config != QarvConfig():
        raise ValueError("the published layout carries no config: only a qarv_base network fits it")
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def untrained_checkpoint(config: QarvConfig = SMALL, seed: int = 0) -> bytes:
    """A random-initialised network's checkpoint, the same bytes for the same seed: what the
    decoder-safety tests and the fuzzer code with (a decoder must hold on any weights, and
    these need no training photos)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return checkpoint_bytes(Qarv(config))


# ------------------------------------------------------------------------------------- codec

def pack_strings(device: str, precision: str, strings: list[bytes]) -> bytes:
    kind = DEVICE_KINDS.index(device) | (_FLOAT64 if precision == "float64" else 0)
    return (_COUNT.pack(kind) + _COUNT.pack(len(strings))
            + b"".join(_LENGTH.pack(len(s)) for s in strings) + b"".join(strings))


def unpack_strings(payload: bytes, name: str = NAME) -> tuple[str, str, list[bytes]]:
    """(device kind, precision, latent strings) of a payload."""
    if len(payload) < 2:
        raise CodecError(f"{name} payload of {len(payload)} bytes is too short")
    kind, n = payload[0], payload[1]
    precision = "float64" if kind & _FLOAT64 else "float32"
    kind &= ~_FLOAT64
    if kind >= len(DEVICE_KINDS):
        raise CodecError(f"{name} payload names device kind {kind}, not one of {DEVICE_KINDS}")
    head = 2 + n * _LENGTH.size
    if len(payload) < head:
        raise CodecError(f"{name} payload is cut short in its {n} string lengths")
    lengths = [_LENGTH.unpack_from(payload, 2 + i * _LENGTH.size)[0] for i in range(n)]
    if head + sum(lengths) != len(payload):
        raise CodecError(f"{name} payload's strings add up to {sum(lengths)} bytes, {len(payload) - head} follow")
    out, pos = [], head
    for length in lengths:
        out.append(payload[pos:pos + length])
        pos += length
    return DEVICE_KINDS[kind], precision, out


def _guarded(stream: bytes, symbols: int) -> bytes:
    """Zero words after a stream so a forged or cut one never reads past its buffer (see
    ``gain_hyperprior._guarded``: CompressAI's rANS decoder has no bounds check)."""
    return stream + bytes(16 * len(stream) + 8 * symbols + 256)


@dataclass
class Prepared:
    x: torch.Tensor       # 1x3xHpxWp in [0, 1], padded to the model's stride
    width: int
    height: int
    analyses: "OrderedDict[float, Analysis]"


class QarvCodec:
    """A QARV network on one device; ``weights`` is a checkpoint's bytes (``--weights FILE``)."""

    name = NAME
    extension = "qarv.rfic"
    speed = "slow"
    capabilities = Capabilities(reconstruct=True, progressive=True, preferred_device="cuda")
    weights_input = FILE
    KEEP_ANALYSES = 3     # per image: the search's latest prices, so the encode reuses its analysis

    def __init__(self, weights: WeightsFile | bytes | None = None, device: str = "auto", threads: int | None = None,
                 precision: str = "float64"):
        refuse_url(self.name, weights)
        if precision not in PRECISIONS:
            raise CodecError(f"{NAME}: precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        if weights is None:
            raise CodecError(f"{NAME} needs --weights: a QARV checkpoint (e.g. the published qarv_base.pt, "
                             f"or one `checkpoint_bytes` wrote); none is bundled and nothing is downloaded")
        if isinstance(weights, (bytes, bytearray)):
            weights = WeightsFile(bytes(weights), "weights given as bytes")
        from ratefit.codecs.gain_hyperprior import resolve_device

        if threads:
            torch.set_num_threads(int(threads))
        self._device = resolve_device(device)
        model, self.checkpoint_extra = load_checkpoint(weights.data, weights.name)
        self.model = (model.float64_prior() if precision == "float64" else model).to(self._device)
        self._decoders = {precision: self.model}   # a stream of the other precision gets a twin, once
        self.weights_sha256 = hashlib.sha256(weights.data).digest()
        c = model.config
        self.control = ControlRange("ln_lambda", math.log(c.lmb_low), math.log(c.lmb_high), increasing=True)
        self._lock = threading.Lock()

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"control": "ln_lambda", "range": f"{math.log(16):.2f}..{math.log(2048):.2f} (qarv_base: λ 16..2048)",
                "kind": "continuous", "device": cls.capabilities.preferred_device, "speed": cls.speed,
                "extension": cls.extension, "needs": "--weights"}

    @property
    def device(self) -> str:
        return self._device.type

    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> Prepared:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise CodecError(f"{NAME} expects uint8 HxWx3, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        x = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(self._device)
        x = x.permute(2, 0, 1)[None].float().div_(255.0)
        s = self.model.config.max_stride
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return Prepared(x, w, h, OrderedDict())

    def _analysis(self, prepared: Prepared, value: float) -> Analysis:
        value = self.control.clamp(value)
        found = prepared.analyses.get(value)
        if found is None:
            found = self.model.analyse(prepared.x, math.exp(value))
            prepared.analyses[value] = found
            while len(prepared.analyses) > self.KEEP_ANALYSES:
                prepared.analyses.popitem(last=False)
        return found

    def _head_bits(self) -> int:
        return 8 * (2 + _LENGTH.size * self.model.num_latents)

    @torch.inference_mode()
    def estimate(self, prepared: Prepared, value: float) -> float:
        with self._lock:
            return self._analysis(prepared, value).bits + self._head_bits()

    @torch.inference_mode()
    def encode(self, prepared: Prepared, value: float) -> bytes:
        with self._lock:
            strings = self.model.compress(self._analysis(prepared, value))
        return pack_strings(self.device, self.precision, strings)

    @torch.inference_mode()
    def reconstruct(self, prepared: Prepared, value: float) -> np.ndarray:
        with self._lock:
            a = self._analysis(prepared, value)
            x_hat = self.model.finish(a.feature, math.exp(self.control.clamp(value)))
        return _to_pixels(x_hat, prepared.width, prepared.height)

    @torch.inference_mode()
    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
        return self.decode_progressive(payload, width, height, value, None)

    @torch.inference_mode()
    def decode_progressive(self, payload: bytes, width: int, height: int, value: float,
                           groups: int | None) -> np.ndarray:
        """The picture from the first ``groups`` latent groups of the stream (None: all of them)."""
        kind, precision, strings = unpack_strings(payload, self.name)
        if kind != self.device:
            raise CodecError(f"{self.name} stream was written on {kind} and decodes only there: every latent's "
                             f"distribution comes from the decoder network, whose numbers differ between "
                             f"device kinds (this codec runs on {self.device}; pass device={kind!r})")
        if len(strings) != self.model.num_latents:
            raise CodecError(f"{self.name} payload has {len(strings)} latent strings, the model has "
                             f"{self.model.num_latents} latent groups")
        if not (self.control.low <= value <= self.control.high):
            raise CodecError(f"{self.name} ln λ {value!r} is outside {self.control.low:g}..{self.control.high:g}")
        if groups is not None and not (isinstance(groups, int) and 0 <= groups <= self.model.num_latents):
            raise CodecError(f"{self.name}: progressive groups must be 0..{self.model.num_latents}, got {groups!r}")
        s = self.model.config.max_stride
        h, w = height + (-height) % s, width + (-width) % s
        guarded = [_guarded(st, n) for st, n in zip(strings, self.model.symbols_per_group(h, w))]
        with self._lock:
            try:
                x_hat = self._decoder(precision).decompress(guarded, math.exp(value), h, w, groups)
            except (RuntimeError, ValueError) as e:
                raise CodecError(f"{self.name} payload does not decode: {e}") from e
        return _to_pixels(x_hat, width, height)

    def _decoder(self, precision: str) -> Qarv:
        """The network that decodes a stream written with its prior path in ``precision``: a
        decoder follows the stream (the payload says which), so restoring needs no option."""
        if precision not in self._decoders:
            twin = copy.deepcopy(self.model)
            self._decoders[precision] = twin.prior_in(torch.float64 if precision == "float64" else torch.float32)
        return self._decoders[precision]


def _to_pixels(x_hat: torch.Tensor, width: int, height: int) -> np.ndarray:
    x_hat = x_hat[0, :, :height, :width]
    return x_hat.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


CODECS = {NAME: QarvCodec}   # named in registry._BUILTIN


def fit(model: Qarv, crops: torch.Tensor, steps: int, lr: float = 2e-4, batch: int = 8, seed: int = 0,
        log_every: int = 0) -> list[tuple[int, float, float, float]]:
    """Train ``model`` on ``crops`` (Nx3xHxW in [0, 1], sides multiples of its stride) for
    ``steps`` Adam steps, each image at a λ drawn from the model's range (uniform in cube-root
    space, as the authors train). Returns (step, loss, bpp, mse) every ``log_every`` steps.

    Enough for small networks and fine-tuning on one machine; the published weights came
    from days on GPUs.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c = model.config
    lo, hi = c.lmb_low ** (1 / 3), c.lmb_high ** (1 / 3)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    log = []
    for step in range(1, steps + 1):
        pick = torch.randint(len(crops), (batch,), generator=g)
        lmb = (lo + (hi - lo) * torch.rand(batch, generator=g)) ** 3
        loss, bpp, mse = model.loss(crops[pick].to(model.bias.device), lmb.to(model.bias.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps):
            log.append((step, loss.item(), bpp.item(), mse.item()))
    model.eval()
    model.update_tables()
    return log
