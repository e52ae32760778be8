"""The network behind ratefit's default codec: a mean-scale hyperprior with gain vectors.

After Cui et al. (CVPR 2021, "Asymmetric Gained Deep Image Compression With Continuous Rate
Adaptation"): the latent ``y`` is scaled per channel by a learned gain vector for each of
``levels`` rate levels before quantisation and by an inverse gain before synthesis; the
hyper-latent ``z`` has its own pair of gains. A real rate-control value ``v`` in
``[0, levels - 1]`` interpolates neighbouring levels exponentially (linearly in log-gain),
which gives continuous rate from one model. The hyperprior is Minnen et al.'s mean-scale
one without the serial autoregressive context, so coding stays parallel.

Transforms, GDN, the entropy bottleneck, the Gaussian conditional and the rANS coder are
CompressAI's. What this module adds is the gains and a coding path that is safe across
devices: everything that decides entropy-coding parameters (inverse hyper-gain, the
hyper-synthesis ``h_s``, scales and means) runs in float64 at inference, because float32
differences between a GPU and a CPU flip scale-table indexes about once per image, and a
flipped index desynchronises the rANS decoder. The CDF tables are built once (on CPU, when
the weights are exported) and shipped with the weights.

Why not CompressAI's ``latent_codecs.GainHyperpriorLatentCodec`` (with
``GainHyperLatentCodec``), which implements the same paper: it is a different network and
a float32 coding path. Its hyper branch runs ``h_a`` on the un-gained ``y`` (here ``h_a``
sees ``y`` after its gain, which is what these weights were trained with), and it runs
``h_s``, the scales, the means and the index lookup inside its own modules in the model's
dtype on the model's device, with no place to put the float64 copy of ``h_s`` nor the
per-position level map, the extrapolated levels, the tiling and ``estimate_bits``' pricing
from the coder's own tables. Adopting it would change the bitstreams of the shipped weights
and give up the guarantee that a GPU's stream decodes on a CPU; the parts of CompressAI used
here are its public entropy models, their ``compress``/``decompress`` and their tables.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

with warnings.catch_warnings():   # compressai 1.2.8 calls torch.jit.script at import, deprecated in torch 2.14
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    from compressai.layers import GDN
    from compressai.models.base import CompressionModel, get_scale_table
    from compressai.models.utils import conv, deconv

PAD_MULTIPLE = 64   # g_a downsamples by 16 and h_a by another 4
# Per rANS stream: the 32-bit state written at the end plus padding to whole 32-bit words;
# counting the padding's worst case keeps the estimate just above the real size.
STREAM_FLUSH_BYTES = 8
# Rate levels usable beyond each end of the trained ones. With the shipped weights, five
# below reach 0.05 bpp on every Kodak image (the hardest, kodim08, gives 0.048 there; one
# below gave 0.116 on average) and three above reach 2.0 bpp on every one (the easiest gives
# 1.50 at the top trained level, 1.89 one above, 2.28 two above).
EXTRAPOLATE_BELOW = 5.0
EXTRAPOLATE_ABOVE = 3.0
LATENT_STRIDE = 16  # pixels per latent position (g_a downsamples four times by 2)
# Context around a tile: g_a sees 30 px each side and g_s under 2 latents each side, so a
# 64 px (4 latent) halo makes each tile's inner part equal to the whole-image result.
TILE_HALO = 64
# h_s (float64) runs over tiles of 32 z positions (2048 px) with 4 of context (it sees < 2).
HYPER_TILE, HYPER_HALO, HYPER_UP = 32, 4, 4
ESTIMATE_BLOCK = 1 << 22   # latent elements priced at a time by estimate_bits (a 4 MP image's latent in one go)


def geometric_lambdas(low: float, high: float, levels: int) -> tuple[float, ...]:
    """``levels`` λ values spaced geometrically from ``low`` to ``high`` (one per rate level)."""
    return tuple(round(low * (high / low) ** (i / (levels - 1)), 7) for i in range(levels))


@dataclass(frozen=True)
class ModelConfig:
    """What is needed to rebuild the network; stored in the weights file's metadata."""

    N: int = 128                # channels of the transforms and of z
    M: int = 192                # channels of y
    lambdas: tuple[float, ...] = field(default_factory=lambda: geometric_lambdas(0.0012, 0.16, 8))  # MSE weight per level

    @property
    def levels(self) -> int:
        return len(self.lambdas)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(N=int(d["N"]), M=int(d["M"]), lambdas=tuple(float(x) for x in d["lambdas"]))


class GainedHyperprior(CompressionModel):
    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        N, M, L = config.N, config.M, config.levels
        if L < 2:
            raise ValueError("a gained model needs at least two rate levels")
        self.g_a = nn.Sequential(conv(3, N), GDN(N), conv(N, N), GDN(N), conv(N, N), GDN(N), conv(N, M))
        self.g_s = nn.Sequential(deconv(M, N), GDN(N, inverse=True), deconv(N, N), GDN(N, inverse=True),
                                 deconv(N, N), GDN(N, inverse=True), deconv(N, 3))
        self.h_a = nn.Sequential(conv(M, N, stride=1, kernel_size=3), nn.LeakyReLU(inplace=True),
                                 conv(N, N), nn.LeakyReLU(inplace=True), conv(N, N))
        self.h_s = nn.Sequential(deconv(N, M), nn.LeakyReLU(inplace=True), deconv(M, M * 3 // 2),
                                 nn.LeakyReLU(inplace=True), conv(M * 3 // 2, M * 2, stride=1, kernel_size=3))
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional(None)
        # Log-gains: positive gains, and exponential interpolation becomes linear. Levels
        # start a factor of ~1.5 apart in quantisation step so they separate from step one.
        start = torch.linspace(-1.5, 1.5, L)[:, None]
        self.log_gain = nn.Parameter(start.repeat(1, M))
        self.log_inv_gain = nn.Parameter(-start.repeat(1, M))
        self.log_hgain = nn.Parameter(torch.zeros(L, N))
        self.log_inv_hgain = nn.Parameter(torch.zeros(L, N))
        self._h_s64: nn.Module | None = None
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ gains

    @staticmethod
    def _interpolate(table: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Gains at (batched) real levels ``v``: log-linear between the two nearest levels.

        Up to ``EXTRAPOLATE_BELOW`` / ``EXTRAPOLATE_ABOVE`` levels beyond the ends continue
        the end segment's line, i.e. the quantisation step keeps scaling geometrically (the
        QVRF idea), which stretches the rate range past what training covered, at a falling
        efficiency (measured in the model card).
        """
        L = table.shape[0]
        v = v.to(table.dtype).clamp(-EXTRAPOLATE_BELOW, L - 1 + EXTRAPOLATE_ABOVE)
        lo = v.floor().long().clamp(0, L - 2)
        t = (v - lo.to(v.dtype))[:, None]
        return torch.exp(table[lo] * (1 - t) + table[lo + 1] * t)[:, :, None, None]

    def gains(self, v: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {name: self._interpolate(getattr(self, f"log_{name}").to(dtype), v)
                for name in ("gain", "inv_gain", "hgain", "inv_hgain")}

    # --------------------------------------------------------------- training

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> dict:
        """Training/evaluation pass with one (real) level per batch item.

        The likelihoods use additive noise (training) or rounding (eval); the synthesis sees
        the rounded latent with a straight-through gradient, which trains the decoder on
        what it will really receive.
        """
        g = self.gains(levels)
        y = self.g_a(x)
        y_g = y * g["gain"]
        z_g = self.h_a(y_g) * g["hgain"]
        z_hat_g, z_lik = self.entropy_bottleneck(z_g)
        params = self.h_s(z_hat_g * g["inv_hgain"])
        scales, means = params.chunk(2, 1)
        _, y_lik = self.gaussian_conditional(y_g, scales, means=means)
        y_hat_g = y_g + (torch.round(y_g - means) + means - y_g).detach()
        x_hat = self.g_s(y_hat_g * g["inv_gain"])
        return {"x_hat": x_hat, "likelihoods": {"y": y_lik, "z": z_lik}}

    # -------------------------------------------------------------- inference

    def h_s64(self) -> nn.Module:
        """A float64 copy of the hyper-synthesis, made once after the weights are loaded."""
        if self._h_s64 is None:
            self._h_s64 = copy.deepcopy(self.h_s).double().eval()
            for p in self._h_s64.parameters():
                p.requires_grad_(False)
        return self._h_s64

    def invalidate_caches(self) -> None:
        self._h_s64 = None
        self._tables = {}

    def analyse(self, x: torch.Tensor, tile: int = 0) -> torch.Tensor:
        """The rate-independent part of encoding (run once per image).

        ``tile`` > 0 runs the analysis over tiles of that many pixels (plus a halo), so the
        transform's activations, which dwarf the latent, stay bounded for any image size.
        """
        return run_tiled(self.g_a, _channels_last(x), tile, TILE_HALO, self.config.M, 1, LATENT_STRIDE)

    def _y_gain(self, name: str, v: float, level_map: torch.Tensor | None, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """y's gain (``name`` = "gain") or inverse gain at level ``v``, or per position at ``level_map``.

        ``level_map`` (h x w, the latent's size) gives every latent position its own level:
        spatial rate control without a retrained model, in the spirit of the spatial-channel
        gains of Gained VAE and of QVRF's scaled quantisation bin. Only y's gains follow it;
        the hyper-latent keeps the scalar level, so the coder's parameters (scales, means,
        z's tables) never depend on the map's floating-point values.
        """
        table = getattr(self, f"log_{name}").detach().to(dtype)
        if level_map is None:
            return self._interpolate(table, torch.tensor([float(v)], device=device))
        values, inverse = torch.unique(level_map.to(device=device, dtype=dtype), return_inverse=True)
        per_value = self._interpolate(table, values)[:, :, 0, 0]         # U x M
        return per_value[inverse].permute(2, 0, 1)[None]                  # 1 x M x h x w

    def _hyper(self, y: torch.Tensor, v: float, level_map: torch.Tensor | None = None,
               dz: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """y and z after their gains at level ``v``.

        ``dz`` is an offset the encoder chose for the hyper-latent (before its gain), e.g. by
        latent refinement (``refine.py``); without it z is ``h_a`` of the gained y, as in
        training. The decoder never computes z, so either way the stream decodes alike.
        """
        vv = torch.tensor([float(v)], device=y.device)
        g = self.gains(vv)
        y_g = y * (g["gain"] if level_map is None else self._y_gain("gain", v, level_map, y.dtype, y.device))
        z = self.h_a(y_g)
        z_g = (z if dz is None else z + dz.to(z.dtype)) * g["hgain"]
        return y_g, z_g, g

    def _entropy_params(self, z_hat_g: torch.Tensor, v: float,
                        exact: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale-table indexes and means from the decoded hyper-latent, in float64.

        ``exact=False`` runs the hyper-synthesis in float32 instead (about 3x faster on a
        CPU): only for rate estimates, which may price an index that flips between the two
        (about one per image) a few bits off; every real encode and decode uses float64.
        """
        dtype = torch.float64 if exact else torch.float32
        vv = torch.tensor([float(v)], device=z_hat_g.device)
        inv_hgain = self._interpolate(self.log_inv_hgain.detach().to(dtype), vv)
        # Over tiles of z for large images: float64 convolutions on the CPU unfold their
        # input (a 48 MP image's would take ~5 GB whole). Encoder and decoder tile alike.
        params = run_tiled(self.h_s64() if exact else self.h_s, z_hat_g.to(dtype) * inv_hgain, HYPER_TILE,
                           HYPER_HALO, 2 * self.config.M, HYPER_UP, 1)
        scales, means = params.chunk(2, 1)
        indexes = self.gaussian_conditional.build_indexes(scales)
        return indexes, means, scales

    def estimate_bits(self, y: torch.Tensor, v: float, level_map: torch.Tensor | None = None,
                      dz: torch.Tensor | None = None, exact: bool = True) -> float:
        """Bits the rANS coder will spend at level ``v``, without running it.

        Every symbol is priced from the very quantised CDF row the coder will use (its
        scale-table index for y, its channel for z), and a symbol outside that row's range
        as the escape symbol plus CompressAI's 4-bit bypass words. What remains is the
        coder's flush and word padding, a few bytes per stream, added at their worst case.
        ``exact=False`` takes the indexes and means from the float32 hyper-synthesis (the
        rate search's estimates: a rare flipped index costs a few bits of accuracy, and the
        search checks the real size anyway).
        """
        y_g, z_g, _ = self._hyper(y, v, level_map, dz)
        z_sym, z_hat_g = self._quantize_z(z_g)
        indexes, means, _ = self._entropy_params(z_hat_g, v, exact)
        bits = coded_bits_by_channel(lambda b: torch.round(y_g[:, b].to(means.dtype) - means[:, b]).long(), indexes,
                                     self._coder_tables(self.gaussian_conditional))
        channel = torch.arange(z_sym.shape[1], device=z_sym.device).reshape(1, -1, 1, 1).expand_as(z_sym)
        return (bits + coded_bits(z_sym, channel, *self._coder_tables(self.entropy_bottleneck))
                + 2 * 8 * STREAM_FLUSH_BYTES)

    def _quantize_z(self, z_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z's symbols and dequantised values, rounded around the medians as the coder does.

        ``_get_medians`` is private, but CompressAI 1.2.8 has no public accessor for the
        medians and its own ``compress``/``decompress`` round around exactly these.
        """
        medians = self.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
        z_sym = torch.round(z_g - medians)
        return z_sym.long(), z_sym + medians

    def _coder_tables(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = "y" if model is self.gaussian_conditional else "z"
        if key not in self._tables:
            self._tables[key] = coder_tables(model)
        return self._tables[key]

    def compress_latent(self, y: torch.Tensor, v: float, level_map: torch.Tensor | None = None,
                        dz: torch.Tensor | None = None) -> tuple[bytes, bytes, torch.Tensor]:
        """Entropy-code ``y`` (batch of one) at level ``v``.

        Returns (z string, y string, ŷ): ŷ is the dequantised gained latent the decoder will
        rebuild from the strings (float64), so the encoder can synthesise what the decoder
        shows (``synthesise``) without decoding its own stream.
        """
        y_g, z_g, _ = self._hyper(y, v, level_map, dz)
        z_strings = self.entropy_bottleneck.compress(z_g)
        z_hat_g = self.entropy_bottleneck.decompress(z_strings, z_g.shape[-2:])
        indexes, means, _ = self._entropy_params(z_hat_g, v)
        y_strings = self.gaussian_conditional.compress(y_g.double(), indexes, means=means)
        return z_strings[0], y_strings[0], torch.round(y_g.double() - means) + means

    def decompress_latent(self, z_string: bytes, y_string: bytes, z_shape: tuple[int, int], v: float,
                          device: torch.device, tile: int = 0, level_map: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the strings back to the synthesis output x̂ in [0, 1] (padded size)."""
        z_hat_g = self.entropy_bottleneck.decompress([z_string], z_shape).to(device)
        indexes, means, _ = self._entropy_params(z_hat_g, v)
        y_hat_g = self.gaussian_conditional.decompress([y_string], indexes, dtype=torch.float64, means=means)
        return self.synthesise(y_hat_g.to(device), v, tile, level_map)

    def synthesise(self, y_hat_g: torch.Tensor, v: float, tile: int = 0,
                    level_map: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse gain (float64) then g_s (float32), clamped to [0, 1]; over tiles if ``tile``.

        The encoder's ``reconstruct`` and the decoder both come here with the same tile
        size for the same image, so they stay bit-exact with each other.
        """
        inv_gain = self._y_gain("inv_gain", v, level_map, torch.float64, y_hat_g.device)
        y = _channels_last((y_hat_g * inv_gain).float())
        s = LATENT_STRIDE
        return run_tiled(self.g_s, y, tile // s, TILE_HALO // s, 3, s, 1).clamp_(0, 1)

    def reconstruct(self, y: torch.Tensor, v: float, tile: int = 0, level_map: torch.Tensor | None = None,
                    dz: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's output at level ``v`` without entropy coding (for R-D probes).

        Quantises exactly as ``compress_latent`` does and synthesises as
        ``decompress_latent`` does, so it equals the real round trip on the same device.
        """
        y_g, z_g, _ = self._hyper(y, v, level_map, dz)
        _, means, _ = self._entropy_params(self._quantize_z(z_g)[1], v)
        return self.synthesise(torch.round(y_g.double() - means) + means, v, tile, level_map)

    def update_tables(self) -> None:
        """Build the CDF tables (entropy bottleneck and Gaussian scale table) on CPU."""
        self.update(scale_table=get_scale_table(), force=True)
        self.invalidate_caches()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory order: the transforms run ~20% faster so on a CPU (oneDNN),
    with the same results here (checked on Kodak: every latent and pixel equal)."""
    return x.contiguous(memory_format=torch.channels_last)


def coder_tables(entropy_model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An entropy model's quantised CDFs, offsets and escape positions as ``coded_bits`` takes them.

    Read through CompressAI's public ``quantized_cdf``, ``offset`` and ``cdf_length`` (of an
    EntropyBottleneck, GaussianConditional or their VBR variants); the buffers behind them
    (``_quantized_cdf`` …) are only named where checkpoints are loaded, as state-dict keys.
    """
    cdf = entropy_model.quantized_cdf
    return cdf.long(), entropy_model.offset.long().to(cdf.device), entropy_model.cdf_length.long().to(cdf.device) - 2


def coded_bits_by_channel(symbols: Callable[[slice], torch.Tensor], indexes: torch.Tensor,
                          tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    """``coded_bits`` over a latent priced a block of channels at a time.

    ``symbols(block)`` gives the block's integer symbols: the int64/float64 temporaries of
    a whole 48 MP latent would take gigabytes, a block's a fraction of the latent itself.
    """
    step = max(1, ESTIMATE_BLOCK // (indexes.shape[-2] * indexes.shape[-1]))   # channels per block
    return sum(coded_bits(symbols(slice(c, c + step)), indexes[:, c:c + step].long(), *tables)
               for c in range(0, indexes.shape[1], step))


def coded_bits(symbols: torch.Tensor, rows: torch.Tensor, cdf: torch.Tensor, offsets: torch.Tensor,
                max_values: torch.Tensor) -> float:
    """What CompressAI's rANS spends on ``symbols``, each coded with CDF row ``rows``.

    In range: -log2 of the row's quantised frequency (16-bit precision). Out of range: the
    escape symbol's frequency plus the bypass words (a 4-bit count, 15 per word, then the
    raw value in 4-bit words), as in CompressAI's ``rans_interface.cpp``.
    """
    value = symbols - offsets[rows]
    max_value = max_values[rows]
    inside = (value >= 0) & (value < max_value)
    pos = torch.where(inside, value, max_value)
    freq = cdf[rows, pos + 1] - cdf[rows, pos]
    bits = float((16 - torch.log2(freq.double())).sum())
    raw = torch.where(value < 0, -2 * value - 1, 2 * (value - max_value))[~inside]
    if raw.numel():
        nbits = torch.where(raw > 0, torch.floor(torch.log2(raw.double().clamp_min(1))) + 1, 0.0)
        words = torch.ceil(nbits / 4)
        bits += float((4 * (torch.floor(words / 15) + 1) + 4 * words).sum())
    return bits


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, halo: int,
              out_channels: int, up: int, down: int) -> torch.Tensor:
    """``fn(x)`` computed over ``tile``-sized windows of x with ``halo`` of context each side.

    ``fn`` maps an input window of HxW to (H*up/down)x(W*up/down); the halo must cover its
    receptive field, so that each tile's inner part equals the whole-input result, and be
    a multiple of ``down`` (as must ``tile``). ``tile`` <= 0, or an input that fits in one
    tile, runs ``fn`` once.
    """
    h, w = x.shape[-2:]
    if tile <= 0 or (h <= tile and w <= tile):
        return fn(x)
    def scaled(start: int, stop: int, origin: int = 0) -> slice:   # input span -> output span
        return slice((start - origin) * up // down, (stop - origin) * up // down)

    out = x.new_empty((x.shape[0], out_channels, h * up // down, w * up // down))
    for r0 in range(0, h, tile):
        for c0 in range(0, w, tile):
            r1, c1 = min(r0 + tile, h), min(c0 + tile, w)
            a, c = max(r0 - halo, 0), max(c0 - halo, 0)
            part = fn(x[..., a:min(r1 + halo, h), c:min(c1 + halo, w)])
            out[..., scaled(r0, r1), scaled(c0, c1)] = part[..., scaled(r0, r1, a), scaled(c0, c1, c)]
    return out


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Replicate-pad the bottom and right edges so the transforms see whole blocks."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def z_shape_for(height: int, width: int) -> tuple[int, int]:
    return math.ceil(height / PAD_MULTIPLE), math.ceil(width / PAD_MULTIPLE)
