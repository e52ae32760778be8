"""``compressai:<zoo name>``: CompressAI's zoo models as ratefit codecs, at continuous rate.

Three families, one registry entry per zoo name:

* **Fixed-rate hyperpriors** (``bmshj2018-hyperprior``, ``mbt2018-mean``): one network per
  quality. Continuous rate comes from a quantisation step Δ on the latent (the QVRF idea:
  code ``round((y - μ) / Δ)`` with the scales divided by Δ, and rescale by Δ in the
  decoder). The control value ``v`` in ``[0, n + 1]`` (``n`` networks) picks the network
  and the step: on ``(k - 1, k]`` network ``k`` with Δ going from Δ*ₖ down to 1, where Δ*ₖ
  is solved per image so that network ``k`` at Δ*ₖ costs what network ``k - 1`` costs at
  Δ = 1. So the target picks the network whose own rate is just above it, Δ ≥ 1 brings it
  down continuously, and rate is continuous and increasing in ``v`` across networks.
  Below the lowest network Δ runs up to ``BOTTOM_STEP``; above the highest, down to
  ``1 / TOP_STEP``. The payload carries the network's quality and Δ (float32).
* **Variable-rate** (``bmshj2018-hyperprior-vbr``, ``mbt2018-mean-vbr``, Kamisli et al.):
  one network whose gain (1/Δ) is interpolated log-linearly between its eight trained
  gains, with its learned quantisation offsets. Its hyper-latent's step and entropy tables
  depend on the gain: tables are built once per actor for a fixed grid of ``VBR_GRID``
  levels (on CPU, in float64) and the payload names the grid index the z string used, so
  no call ever rebuilds shared tables under another.
* **Autoregressive** (``mbt2018``, ``cheng2020-anchor``, ``cheng2020-attn``): CompressAI's
  own serial coder; the control value is the network (discrete quality), no estimate, so
  the search encodes for real. Marked slow.

As in ratefit's own model, everything that decides entropy-coding parameters runs in
float64 (hyper-synthesis, scales, means, steps) for the first two families, so a bitstream
written on a GPU decodes on a CPU; the transforms run in float32 on the codec's device.
"""

from __future__ import annotations

import copy
import math
import struct
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ratefit.codecs.base import Capabilities, CodecError, ControlRange
from ratefit.codecs.gain_hyperprior import DEFAULT_TILE, _guarded, _to_pixels, resolve_device
from ratefit.codecs.gained import (HYPER_HALO, HYPER_TILE, HYPER_UP, LATENT_STRIDE, PAD_MULTIPLE,
                                   STREAM_FLUSH_BYTES, TILE_HALO, coded_bits, coded_bits_by_channel, coder_tables,
                                   pad_to_multiple, run_tiled, z_shape_for)
from ratefit.codecs.weights import CHECKPOINTS, WeightsError, refuse_url
from ratefit.codecs.zoo_weights import Source, cached, load_state_dict, sha256

PREFIX = "compressai:"
BOTTOM_STEP = 3.0      # Δ reached at v = 0 on the lowest network
TOP_STEP = 2.0         # 1/Δ reached at v = n + 1 on the highest network
MAX_JUNCTION_STEP = 8.0
JUNCTION_ITERATIONS = 16
VBR_GRID = 64          # hyper-latent table grid over the VBR model's level range


@dataclass(frozen=True)
class ZooModel:
    family: str                      # "fixed" | "vbr" | "autoregressive"
    architecture: str                # class name in compressai.models
    qualities: tuple[int, ...] = ()  # the zoo's quality levels (empty for VBR: one network)
    means: bool = False              # Gaussian conditional with means (mbt2018-mean)


ZOO: dict[str, ZooModel] = {
    "bmshj2018-hyperprior": ZooModel("fixed", "ScaleHyperprior", tuple(range(1, 9)), means=False),
    "mbt2018-mean": ZooModel("fixed", "MeanScaleHyperprior", tuple(range(1, 9)), means=True),
    "bmshj2018-hyperprior-vbr": ZooModel("vbr", "ScaleHyperpriorVbr", means=False),
    "mbt2018-mean-vbr": ZooModel("vbr", "MeanScaleHyperpriorVbr", means=True),
    "mbt2018": ZooModel("autoregressive", "JointAutoregressiveHierarchicalPriors", tuple(range(1, 9))),
    "cheng2020-anchor": ZooModel("autoregressive", "Cheng2020Anchor", tuple(range(1, 7))),
    "cheng2020-attn": ZooModel("autoregressive", "Cheng2020Attention", tuple(range(1, 7))),
}

_FIXED_HEAD = struct.Struct("<BfI")    # quality, Δ, len(z string)
_VBR_HEAD = struct.Struct("<BBI")      # grid index, grid size (0: no grid), len(z string)
_AR_HEAD = struct.Struct("<BI")        # quality, len(z string)


def build_model(zoo_name: str, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """The zoo architecture with ``state`` loaded; WeightsError when the checkpoint does not fit it."""
    import compressai.models as models

    spec = ZOO[zoo_name]
    cls = getattr(models, spec.architecture)
    try:
        if spec.family == "vbr":
            model = _vbr_from_state_dict(cls, dict(state))
        else:
            model = cls.from_state_dict(dict(state))
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        raise WeightsError(f"{what} does not fit {PREFIX}{zoo_name} ({spec.architecture}): "
                           f"{' '.join(str(e).split())[:400]}") from None
    if model.entropy_bottleneck.offset.numel() == 0 or model.gaussian_conditional.offset.numel() == 0:
        model.update(force=True)   # a checkpoint saved before update(): build the tables here, on CPU
    return model.eval()


def _vbr_from_state_dict(cls: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """CompressAI's ``from_state_dict`` for the VBR models, also when the checkpoint holds tables.

    CompressAI resizes the table buffers of its fixed entropy bottleneck before loading, not
    those of the VBR one, so a VBR checkpoint saved after ``update()`` would not load.
    """
    from compressai.models.utils import update_registered_buffers

    state.pop("QuantOffset", None)
    model = cls(state["g_a.0.weight"].size(0), state["g_a.6.weight"].size(0),
                vr_entbttlnck=any(k.startswith("gayn2zqstep.") for k in state))
    # The buffers' own names: they are the checkpoint's state-dict keys (CompressAI's format).
    update_registered_buffers(model.entropy_bottleneck, "entropy_bottleneck",
                              ["_quantized_cdf", "_offset", "_cdf_length"], state)
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------- hyperprior networks

class HyperNet:
    """One loaded hyperprior network (fixed-rate or VBR) with a float64 entropy-parameter path."""

    def __init__(self, model: nn.Module, sha: bytes, quality: int, means: bool, device: torch.device):
        self.quality, self.sha, self.means = quality, sha, means
        self.model = model.to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.h_s64 = copy.deepcopy(self.model.h_s).double().eval()
        self.h_s_channels = (2 if means else 1) * int(self.model.M)
        gc, eb = self.model.gaussian_conditional, self.model.entropy_bottleneck
        self.y_tables, self.z_tables = coder_tables(gc), coder_tables(eb)
        self.device = device

    def analyse(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        return run_tiled(self.model.g_a, x, tile, TILE_HALO, int(self.model.M), 1, LATENT_STRIDE)

    def hyper(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.h_a(y if self.means else torch.abs(y))

    def quantize_z(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z's symbols and dequantised values around the medians, as the entropy bottleneck codes them."""
        medians = self.model.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
        z_sym = torch.round(z - medians)
        return z_sym.long(), z_sym + medians

    def params(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and means (zeros for a scale-only model) from the decoded hyper-latent, in float64."""
        p = run_tiled(self.h_s64, z_hat.double(), HYPER_TILE, HYPER_HALO, self.h_s_channels, HYPER_UP, 1)
        if self.means:
            scales, means = p.chunk(2, 1)
            return scales, means
        return p, torch.zeros_like(p)

    def indexes(self, scales: torch.Tensor, step: float) -> torch.Tensor:
        return self.model.gaussian_conditional.build_indexes(scales / step)

    def y_bits(self, y: torch.Tensor, scales: torch.Tensor, means: torch.Tensor, step: float) -> float:
        return coded_bits_by_channel(lambda b: torch.round((y[:, b].double() - means[:, b]) / step).long(),
                                     self.indexes(scales, step), self.y_tables)

    def z_bits(self, z_sym: torch.Tensor, tables: tuple | None = None) -> float:
        channel = torch.arange(z_sym.shape[1], device=z_sym.device).reshape(1, -1, 1, 1).expand_as(z_sym)
        return coded_bits(z_sym, channel, *(tables or self.z_tables))

    def code_y(self, y: torch.Tensor, scales: torch.Tensor, means: torch.Tensor, step: float) -> bytes:
        centred = torch.round((y.double() - means) / step)
        return self.model.gaussian_conditional.compress(centred, self.indexes(scales, step))[0]

    def decode_y(self, y_string: bytes, scales: torch.Tensor, step: float) -> torch.Tensor:
        """The coded integers (float64) of a y string."""
        indexes = self.indexes(scales, step)
        return self.model.gaussian_conditional.decompress([y_string], indexes, dtype=torch.float64)

    def synthesise(self, y_hat: torch.Tensor, tile: int) -> torch.Tensor:
        s = LATENT_STRIDE
        return run_tiled(self.model.g_s, y_hat.float().to(self.device), tile // s, TILE_HALO // s, 3, s, 1).clamp_(0, 1)


def _to_tensor(image: np.ndarray, device: torch.device, name: str) -> torch.Tensor:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CodecError(f"{name} expects uint8 HxWx3, got {image.dtype} {image.shape}")
    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(device)
    return pad_to_multiple(x.permute(2, 0, 1)[None].float().div_(255.0))


def _split(payload: bytes, head: struct.Struct, name: str) -> tuple[tuple, bytes, bytes]:
    """(header fields, z string, y string) of a payload ``head`` + z + y; the last field is len(z)."""
    if len(payload) < head.size:
        raise CodecError(f"{name} payload of {len(payload)} bytes is too short")
    fields = head.unpack_from(payload)
    zlen = fields[-1]
    if zlen > len(payload) - head.size:
        raise CodecError(f"{name} payload says its z string has {zlen} bytes, only {len(payload) - head.size} follow")
    return fields, payload[head.size:head.size + zlen], payload[head.size + zlen:]


# ------------------------------------------------------------------------------ shared loading

class _ZooCodecBase:
    """Options, device, lock and the lazily loaded networks every zoo codec shares."""

    extension: str
    speed = "fast"
    capabilities = Capabilities(tiles=True, preferred_device="cuda")

    def __init__(self, zoo_name: str, weights: list[Source] | None, device: str, tile: int, threads: int | None):
        self.zoo_name, self.spec, self.name = zoo_name, ZOO[zoo_name], PREFIX + zoo_name
        self.extension = f"{zoo_name}.rfic"
        refuse_url(self.name, weights)
        if not weights:
            raise CodecError(f"{self.name} needs weights: --weights FILE_OR_FOLDER (a local path, s3://… or "
                             f"https://…, CompressAI's checkpoint format), or --weights zoo to download "
                             f"CompressAI's pretrained ones (needs network access)")
        if not isinstance(tile, int) or isinstance(tile, bool) or tile < 0 or tile % PAD_MULTIPLE:
            raise CodecError(f"{self.name}: tile must be 0 (never tile) or a positive multiple of "
                             f"{PAD_MULTIPLE} pixels, got {tile!r}")
        if threads:
            torch.set_num_threads(int(threads))
        self.tile = tile
        self._device = resolve_device("cpu" if device == "auto" and self.capabilities.preferred_device == "cpu"
                                      else device)
        if not all(isinstance(s, Source) for s in weights):
            raise CodecError(f"{self.name}: weights must be a list of zoo_weights.Source (build the codec with "
                             f"ratefit.workers.codec_loader.load_codec to give a file, folder or `zoo`)")
        self._lock = threading.RLock()
        self.sources: list[Source] = sorted(weights, key=lambda s: s.quality)
        self._by_quality = {s.quality: s for s in self.sources}
        self._loaded: dict[int, Any] = {}

    @property
    def device(self) -> str:
        return self._device.type

    def _load(self, source: Source) -> tuple[nn.Module, bytes]:
        data = source.read()
        state = load_state_dict(data, source.label)
        return build_model(self.zoo_name, state, source.label), sha256(data)

    def network(self, quality: int) -> Any:
        """The network of ``quality``, loaded on first use (once per process and device)."""
        with self._lock:
            if quality not in self._loaded:
                source = self._by_quality.get(quality)
                if source is None:
                    raise CodecError(f"{self.name}: no network of quality {quality} among the weights given "
                                     f"(qualities {', '.join(str(s.quality) for s in self.sources)})")
                key = (self.zoo_name, source.url, str(self._device))
                self._loaded[quality] = cached(key, lambda: self._wrap(source, *self._load(source)))
            return self._loaded[quality]

    def _wrap(self, source: Source, model: nn.Module, sha: bytes) -> Any:
        return HyperNet(model, sha, source.quality, self.spec.means, self._device)

    def _set_identity(self) -> bytes:
        """A 32-byte identity of the set of networks (headers carry the network's own SHA-256)."""
        return sha256("\n".join(f"{s.quality} {s.label}" for s in self.sources).encode())


class _OneNetworkPerQuality(_ZooCodecBase):
    """Codecs holding one network per zoo quality; a payload's first byte names its network."""

    capabilities = replace(_ZooCodecBase.capabilities, per_payload_weights=True)

    def weights_sha256_of(self, payload: bytes) -> bytes:
        """The SHA-256 of the network that wrote ``payload`` (loading it if needed)."""
        if len(payload) < 1:
            raise CodecError(f"{self.name} payload is empty")
        with self._lock:
            return self.network(payload[0]).sha


# ------------------------------------------------------------------------------ fixed-rate + Δ

@dataclass
class _Latent:
    y: torch.Tensor
    z: torch.Tensor
    z_sym: torch.Tensor
    scales: torch.Tensor
    means: torch.Tensor
    z_bits: float


@dataclass
class FixedPrepared:
    x: torch.Tensor
    width: int
    height: int
    latents: dict[int, _Latent] = field(default_factory=dict)    # by network position k (1..n)
    junctions: dict[int, float] = field(default_factory=dict)    # k -> Δ*ₖ


class ZooFixedRateCodec(_OneNetworkPerQuality):
    """A set of fixed-rate hyperprior networks with a continuous quantisation step between them."""

    capabilities = replace(_OneNetworkPerQuality.capabilities, reconstruct=True)

    def __init__(self, zoo_name: str, weights: list[Source] | None = None, device: str = "auto",
                 threads: int | None = None, tile: int = DEFAULT_TILE):
        super().__init__(zoo_name, weights, device, tile, threads)
        self.control = ControlRange("quality", 0.0, float(len(self.sources) + 1), increasing=True)
        self.weights_sha256 = self._set_identity()
        self.network(self.sources[0].quality)   # the others load when a target needs them; this one fails fast

    # ---- which network and which step a control value means, for one image
    def _latent(self, prep: FixedPrepared, k: int) -> _Latent:
        if k not in prep.latents:
            net = self.network(self.sources[k - 1].quality)
            y = net.analyse(prep.x, self.tile)
            z = net.hyper(y)
            z_sym, z_hat = net.quantize_z(z)
            scales, means = net.params(z_hat)
            prep.latents[k] = _Latent(y, z, z_sym, scales, means, net.z_bits(z_sym))
        return prep.latents[k]

    def _bits(self, prep: FixedPrepared, k: int, step: float) -> float:
        lat = self._latent(prep, k)
        net = self.network(self.sources[k - 1].quality)
        return net.y_bits(lat.y, lat.scales, lat.means, step) + lat.z_bits + 8 * (_FIXED_HEAD.size + 2 * STREAM_FLUSH_BYTES)

    def _junction(self, prep: FixedPrepared, k: int) -> float:
        """Δ*ₖ: the step at which network k costs what network k - 1 costs at Δ = 1 (this image)."""
        if k == 1:
            return BOTTOM_STEP
        if k not in prep.junctions:
            below = self._bits(prep, k - 1, 1.0)
            if self._bits(prep, k, 1.0) <= below:
                step = 1.0      # network k is no dearer than k - 1 here: no step needed
            elif self._bits(prep, k, MAX_JUNCTION_STEP) > below:
                step = MAX_JUNCTION_STEP
            else:
                lo, hi = 0.0, math.log(MAX_JUNCTION_STEP)
                for _ in range(JUNCTION_ITERATIONS):
                    mid = 0.5 * (lo + hi)
                    if self._bits(prep, k, math.exp(mid)) > below:
                        lo = mid
                    else:
                        hi = mid
                step = math.exp(hi)
            prep.junctions[k] = step
        return prep.junctions[k]

    def _step(self, prep: FixedPrepared, value: float) -> tuple[int, float]:
        n = len(self.sources)
        v = self.control.clamp(value)
        if v >= n:
            k, step = n, TOP_STEP ** -(v - n)
        else:
            k = max(1, math.ceil(v))
            step = 1.0 if v == k else self._junction(prep, k) ** (k - v)
        return k, float(np.float32(step))   # the decoder sees the float32 in the payload

    # ---- the codec interface
    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> FixedPrepared:
        h, w = image.shape[:2]
        return FixedPrepared(_to_tensor(image, self._device, self.name), w, h)

    @torch.inference_mode()
    def estimate(self, prepared: FixedPrepared, value: float) -> float:
        with self._lock:
            k, step = self._step(prepared, value)
            return self._bits(prepared, k, step)

    @torch.inference_mode()
    def encode(self, prepared: FixedPrepared, value: float) -> bytes:
        with self._lock:
            k, step = self._step(prepared, value)
            lat, net = self._latent(prepared, k), self.network(self.sources[k - 1].quality)
            z = net.model.entropy_bottleneck.compress(lat.z)[0]
            y = net.code_y(lat.y, lat.scales, lat.means, step)
        return _FIXED_HEAD.pack(net.quality, step, len(z)) + z + y

    @torch.inference_mode()
    def reconstruct(self, prepared: FixedPrepared, value: float) -> np.ndarray:
        with self._lock:
            k, step = self._step(prepared, value)
            lat, net = self._latent(prepared, k), self.network(self.sources[k - 1].quality)
            y_hat = torch.round((lat.y.double() - lat.means) / step) * step + lat.means
            return _to_pixels(net.synthesise(y_hat, self.tile), prepared.width, prepared.height)

    @torch.inference_mode()
    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
        (quality, step, _), z, y = _split(payload, _FIXED_HEAD, self.name)
        if not (math.isfinite(step) and 1 / (2 * MAX_JUNCTION_STEP) <= step <= 2 * MAX_JUNCTION_STEP):
            raise CodecError(f"{self.name} payload has quantisation step {step!r}, outside what an encoder writes")
        with self._lock:
            net = self.network(quality)
            zh, zw = z_shape_for(height, width)
            try:
                z_hat = net.model.entropy_bottleneck.decompress([_guarded(z, net.model.N * zh * zw)], (zh, zw))
                scales, means = net.params(z_hat.to(self._device))
                sym = net.decode_y(_guarded(y, net.model.M * 16 * zh * zw), scales, step)
            except (RuntimeError, ValueError) as e:
                raise CodecError(f"{self.name} payload does not decode: {e}") from e
            return _to_pixels(net.synthesise(sym * step + means, self.tile), width, height)


# ------------------------------------------------------------------------------------- VBR

class _VbrNet(HyperNet):
    """A VBR network: gains, learned quantisation offsets and a grid of hyper-latent tables."""

    def __init__(self, model: nn.Module, sha: bytes, quality: int, means: bool, device: torch.device):
        super().__init__(model, sha, quality, means, device)
        self.log_gains = [math.log(abs(float(g))) for g in model.Gain.detach().cpu().double()]
        self.grid: list[tuple[float, tuple]] = []   # (z step, coder tables) per grid index
        if model.vr_entbttlnck:
            eb64 = copy.deepcopy(model.entropy_bottleneck).cpu().double()
            to_step = copy.deepcopy(nn.Sequential(model.gayn2zqstep, model.lower_bound_zqstep)).cpu().double()
            for i in range(VBR_GRID):
                gain = self.gain(self.grid_level(i))
                qs = float(to_step(torch.tensor([[1.0 / gain]], dtype=torch.float64)))
                eb64.update_variable(force=True, qs=torch.tensor(qs, dtype=torch.float64))
                self.grid.append((qs, tuple(t.to(device) for t in coder_tables(eb64))))
        self.medians64 = model.entropy_bottleneck._get_medians().detach().double().reshape(1, -1, 1, 1)
        self.offsets = model.QuantABCD.to(device)

    @property
    def levels(self) -> int:
        return len(self.log_gains)

    def gain(self, level: float) -> float:
        """The gain (1/Δ) at a real level, log-linear between the trained ones."""
        lo = min(max(int(math.floor(level)), 0), self.levels - 2)
        t = level - lo
        return math.exp(self.log_gains[lo] * (1 - t) + self.log_gains[lo + 1] * t)

    def grid_index(self, level: float) -> int:
        return int(round(level / (self.levels - 1) * (VBR_GRID - 1))) if self.grid else 0

    def grid_level(self, index: int) -> float:
        return index * (self.levels - 1) / (VBR_GRID - 1)

    def quantize_z_at(self, z: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.grid:
            z_sym, z_hat = self.quantize_z(z)
            return z_sym, z_hat.double()
        qs = self.grid[index][0]
        z_sym = torch.round((z.double() - self.medians64) / qs)
        return z_sym.long(), z_sym * qs + self.medians64

    def z_tables_at(self, index: int) -> tuple:
        return self.grid[index][1] if self.grid else self.z_tables

    def code_z(self, z_sym: torch.Tensor, index: int) -> bytes:
        from compressai.ans import RansEncoder

        cdf, offset, length = self.z_tables_at(index)
        channel = torch.arange(z_sym.shape[1]).reshape(1, -1, 1, 1).expand_as(z_sym)
        return RansEncoder().encode_with_indexes(z_sym.reshape(-1).int().tolist(), channel.reshape(-1).int().tolist(),
                                                 cdf.int().tolist(), (length + 2).int().tolist(),
                                                 offset.int().tolist())

    def decode_z(self, z_string: bytes, index: int, shape: tuple[int, int]) -> torch.Tensor:
        from compressai.ans import RansDecoder

        cdf, offset, length = self.z_tables_at(index)
        n = int(self.model.N)
        channel = torch.arange(n).reshape(1, -1, 1, 1).expand(1, n, *shape)
        values = RansDecoder().decode_with_indexes(z_string, channel.reshape(-1).int().tolist(), cdf.int().tolist(),
                                                   (length + 2).int().tolist(), offset.int().tolist())
        z_sym = torch.tensor(values, dtype=torch.float64).reshape(1, n, *shape)
        if not self.grid:   # the fixed bottleneck's own float32 arithmetic, as quantize_z does
            medians = self.model.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1).cpu()
            return (z_sym.float() + medians).double()
        return z_sym * self.grid[index][0] + self.medians64.cpu()

    def dequantize_y(self, sym: torch.Tensor, scales: torch.Tensor, means: torch.Tensor, gain: float) -> torch.Tensor:
        """ŷ from the coded integers: the learned reconstruction offsets, then the step and means."""
        if self.model.no_quantoffset:
            return sym / gain + means
        q_abs, signs = sym.abs(), torch.sign(sym)
        q_stdev = self.model.gaussian_conditional.lower_bound_scale(scales * gain).float().to(self.device)
        inputs = torch.stack((q_stdev, torch.full_like(q_stdev, gain)), dim=4)
        offsets = (-self.offsets(inputs).squeeze(4)).double().to(sym.device)
        offsets[q_abs < 0.0001] = 0
        return signs * (q_abs + offsets) / gain + means


@dataclass
class VbrPrepared:
    x: torch.Tensor
    width: int
    height: int
    y: torch.Tensor | None = None
    z: torch.Tensor | None = None
    hyper: dict[int, tuple] = field(default_factory=dict)   # grid index -> (z_sym, scales, means, z bits)


class ZooVariableRateCodec(_ZooCodecBase):
    """A VBR zoo model: one network, continuous gain, hyper-latent tables on a fixed grid."""

    capabilities = replace(_ZooCodecBase.capabilities, reconstruct=True)

    def __init__(self, zoo_name: str, weights: list[Source] | None = None, device: str = "auto",
                 threads: int | None = None, tile: int = DEFAULT_TILE):
        super().__init__(zoo_name, weights, device, tile, threads)
        if len(self.sources) != 1:
            raise CodecError(f"{self.name} is one network; the weights given hold {len(self.sources)}")
        self.net: _VbrNet = self.network(self.sources[0].quality)
        self.weights_sha256 = self.net.sha
        self.control = ControlRange("level", 0.0, float(self.net.levels - 1), increasing=True)

    def _wrap(self, source: Source, model: nn.Module, sha: bytes) -> Any:
        return _VbrNet(model, sha, source.quality, self.spec.means, self._device)

    def _hyper(self, prep: VbrPrepared, index: int) -> tuple:
        if prep.y is None:
            prep.y = self.net.analyse(prep.x, self.tile)
            prep.z = self.net.hyper(prep.y)
        if index not in prep.hyper:
            z_sym, z_hat = self.net.quantize_z_at(prep.z, index)
            scales, means = self.net.params(z_hat)
            prep.hyper[index] = (z_sym, scales, means, self.net.z_bits(z_sym, self.net.z_tables_at(index)))
        return prep.hyper[index]

    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> VbrPrepared:
        h, w = image.shape[:2]
        return VbrPrepared(_to_tensor(image, self._device, self.name), w, h)

    def _at(self, prep: VbrPrepared, value: float) -> tuple[int, float, tuple]:
        v = self.control.clamp(value)
        index = self.net.grid_index(v)
        return index, self.net.gain(v), self._hyper(prep, index)

    @torch.inference_mode()
    def estimate(self, prepared: VbrPrepared, value: float) -> float:
        with self._lock:
            _, gain, (_, scales, means, z_bits) = self._at(prepared, value)
            return (self.net.y_bits(prepared.y, scales, means, 1.0 / gain) + z_bits
                    + 8 * (_VBR_HEAD.size + 2 * STREAM_FLUSH_BYTES))

    @torch.inference_mode()
    def encode(self, prepared: VbrPrepared, value: float) -> bytes:
        with self._lock:
            index, gain, (z_sym, scales, means, _) = self._at(prepared, value)
            z = self.net.code_z(z_sym.cpu(), index)
            y = self.net.code_y(prepared.y, scales, means, 1.0 / gain)
        return _VBR_HEAD.pack(index, VBR_GRID if self.net.grid else 0, len(z)) + z + y

    @torch.inference_mode()
    def reconstruct(self, prepared: VbrPrepared, value: float) -> np.ndarray:
        with self._lock:
            _, gain, (_, scales, means, _) = self._at(prepared, value)
            sym = torch.round((prepared.y.double() - means) * gain)
            y_hat = self.net.dequantize_y(sym, scales, means, gain)
            return _to_pixels(self.net.synthesise(y_hat, self.tile), prepared.width, prepared.height)

    @torch.inference_mode()
    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
        (index, grid, _), z, y = _split(payload, _VBR_HEAD, self.name)
        expected = VBR_GRID if self.net.grid else 0
        if grid != expected or (grid and index >= grid):
            raise CodecError(f"{self.name} payload names hyper-latent table {index} of a grid of {grid}; "
                             f"these weights use a grid of {expected}")
        if not (self.control.low <= value <= self.control.high):
            raise CodecError(f"{self.name} level {value!r} is outside {self.control.low:g}..{self.control.high:g}")
        gain = self.net.gain(value)
        with self._lock:
            zh, zw = z_shape_for(height, width)
            m = self.net.model
            try:
                z_hat = self.net.decode_z(_guarded(z, m.N * zh * zw), index, (zh, zw))
                scales, means = self.net.params(z_hat.to(self._device))
                sym = self.net.decode_y(_guarded(y, m.M * 16 * zh * zw), scales, 1.0 / gain)
            except (RuntimeError, ValueError) as e:
                raise CodecError(f"{self.name} payload does not decode: {e}") from e
            y_hat = self.net.dequantize_y(sym, scales, means, gain)
            return _to_pixels(self.net.synthesise(y_hat, self.tile), width, height)


# --------------------------------------------------------------------------- autoregressive

@dataclass
class _ArNet:
    model: nn.Module
    sha: bytes
    quality: int


@dataclass
class ArPrepared:
    x: torch.Tensor
    width: int
    height: int


class ZooAutoregressiveCodec(_OneNetworkPerQuality):
    """A set of autoregressive networks (serial context model): one discrete quality per network."""

    speed = "slow"
    # CompressAI's serial context coding is not faster on a GPU; no decoder-free reconstruction.
    capabilities = replace(_OneNetworkPerQuality.capabilities, preferred_device="cpu")

    def __init__(self, zoo_name: str, weights: list[Source] | None = None, device: str = "auto",
                 threads: int | None = None, tile: int = 0):
        super().__init__(zoo_name, weights, device, tile, threads)
        self.control = ControlRange("network", 1.0, float(len(self.sources)), increasing=True, discrete=True)
        self.weights_sha256 = self._set_identity()
        self.network(self.sources[0].quality)

    def _wrap(self, source: Source, model: nn.Module, sha: bytes) -> Any:
        model = model.to(self._device)
        for p in model.parameters():
            p.requires_grad_(False)
        return _ArNet(model, sha, source.quality)

    def _net_at(self, value: float) -> _ArNet:
        return self.network(self.sources[int(self.control.clamp(value)) - 1].quality)

    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> ArPrepared:
        h, w = image.shape[:2]
        return ArPrepared(_to_tensor(image, self._device, self.name), w, h)

    def estimate(self, prepared: ArPrepared, value: float) -> None:
        return None

    @torch.inference_mode()
    def encode(self, prepared: ArPrepared, value: float) -> bytes:
        with self._lock:
            net = self._net_at(value)
            out = net.model.compress(prepared.x)
        (y,), (z,) = out["strings"]
        return _AR_HEAD.pack(net.quality, len(z)) + z + y

    @torch.inference_mode()
    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
        (quality, _), z, y = _split(payload, _AR_HEAD, self.name)
        with self._lock:
            net = self.network(quality)
            zh, zw = z_shape_for(height, width)
            m = net.model
            try:
                x_hat = m.decompress([[_guarded(y, m.M * 16 * zh * zw)], [_guarded(z, m.N * zh * zw)]], (zh, zw))["x_hat"]
            except (RuntimeError, ValueError) as e:
                raise CodecError(f"{self.name} payload does not decode: {e}") from e
        return _to_pixels(x_hat.clamp(0, 1), width, height)


# ------------------------------------------------------------------------------- registration

_CLASSES = {"fixed": ZooFixedRateCodec, "vbr": ZooVariableRateCodec, "autoregressive": ZooAutoregressiveCodec}


class ZooFactory:
    """The registry's factory for one zoo name; ``describe`` answers without loading weights."""

    weights_input = CHECKPOINTS   # the loader turns a ``weights`` file, folder or ``zoo`` into Sources

    def __init__(self, zoo_name: str):
        self.zoo_name = zoo_name
        self.qualities = ZOO[zoo_name].qualities
        self.cls: Callable[..., Any] = _CLASSES[ZOO[zoo_name].family]

    def __call__(self, **options: Any) -> Any:
        return self.cls(self.zoo_name, **options)

    @property
    def capabilities(self) -> Capabilities:
        """The codec class's (``preferred_device`` answers without loading weights)."""
        return self.cls.capabilities

    def describe(self) -> dict[str, Any]:
        spec = ZOO[self.zoo_name]
        n = len(spec.qualities)
        control = {"fixed": ("quality", f"0..{n + 1}", "continuous"), "vbr": ("level", "0..7", "continuous"),
                   "autoregressive": ("network", f"1..{n}", "discrete")}[spec.family]
        return {"control": control[0], "range": control[1], "kind": control[2], "device": self.cls.capabilities.preferred_device,
                "speed": self.cls.speed, "extension": f"{self.zoo_name}.rfic", "needs": "--weights"}


CODECS = {PREFIX + name: ZooFactory(name) for name in ZOO}   # named in registry._BUILTIN
