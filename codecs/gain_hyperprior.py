"""``gain-hyperprior``: ratefit's learned continuous-rate codec (see ``gained.py``).

Rate-control value: the real rate level ``v`` in ``[-5, levels + 2]`` (higher = more bits):
the trained levels are 0 … levels-1, and log-linear extrapolation, five levels below and three
above, stretches the range to 0.05–2 bpp on every Kodak image (see ``gained.py``).
``prepare`` runs the analysis transform once; ``estimate`` prices a level from the
likelihoods alone (no entropy coding, no synthesis), so the target search costs one
analysis, a handful of cheap hyperprior passes and usually one real rANS encode.

Payload: ``u32 len(z string)`` + z string + y string (little endian). The image size and
``v`` come from the container header, the weights' SHA-256 too, and decoding refuses other
weights.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, replace

import numpy as np
import torch

from ratefit.codecs.base import Capabilities, CodecError, ControlRange
from ratefit.codecs.gained import (EXTRAPOLATE_ABOVE, EXTRAPOLATE_BELOW, PAD_MULTIPLE, GainedHyperprior, ModelConfig, pad_to_multiple,
                                   z_shape_for)
from ratefit.codecs.refine import refine_latents
from ratefit.codecs.weights import (FILE, WeightsError, WeightsFile, bundled_weights, parse_weights, refuse_url,
                                    weights_bytes)

NAME = "gain-hyperprior"
BUNDLED_WEIGHTS = "gain-hyperprior.safetensors"
_LEN = struct.Struct("<I")
# Images wider or taller than this go through the transforms in tiles (with a halo, so the
# result matches the whole-image one): memory stays bounded for any size. Changing it does
# not change the format; encoder and decoder only need the same value for bit-exact output.
DEFAULT_TILE = 1024


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CodecError(f"device {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


def load_model(weights: WeightsFile, device: torch.device) -> tuple[GainedHyperprior, bytes, dict[str, str]]:
    """The model in ``weights`` on ``device`` (eval mode), its SHA-256 and the file's metadata.

    ``ratefit.workers.codec_loader.read_weights_file`` reads one from a URL.
    """
    tensors, config, sha, meta = parse_weights(weights)
    model = GainedHyperprior(ModelConfig.from_dict(config))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise WeightsError(f"{weights.name}: weights do not fit the model they describe: {e}") from e
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, sha, meta


_HALF_PREFIXES = ("g_a.", "g_s.", "h_a.")   # transforms whose precision does not touch the entropy coder


def export_weights(model: GainedHyperprior, extra: dict[str, str] | None = None) -> bytes:
    """Weights file bytes for ``model``: CDF tables rebuilt on CPU, analysis/synthesis in fp16.

    ``h_s``, the entropy models and the gains stay float32: they decide the coder's
    parameters, so they must be the same numbers on every machine that decodes.
    """
    model = model.to("cpu").eval()
    model.update_tables()
    state = {k: (v.half() if k.startswith(_HALF_PREFIXES) and v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    return weights_bytes(state, model.config.to_dict(), extra)


@dataclass
class Prepared:
    y: torch.Tensor
    width: int
    height: int
    dz: torch.Tensor | None = None  # refinement's offset on the hyper-latent (before its gain)
    refine_steps: int = 0           # latent refinement steps behind y and z
    # The last real encode's level and dequantised latent: what the decoder rebuilds from its
    # stream, so ``reconstruct`` at that level only synthesises (no hyper-path, no decoding).
    coded: tuple[float, torch.Tensor] | None = None


class GainHyperpriorCodec:
    """One loaded model on one device; ``weights`` is a weights file's bytes (default: the bundled file).

    Build it with ``ratefit.workers.codec_loader.load_codec`` to give ``weights`` as a URL.
    """

    name = NAME
    extension = "ghp.rfic"
    speed = "fast"
    # A GPU per actor when the cluster has one; rate estimates and decoder-free reconstructions
    # (search, budget probes), latent refinement, tiles for bounded memory.
    capabilities = Capabilities(reconstruct=True, refine=True, tiles=True, batch=True, preferred_device="cuda")
    weights_input = FILE        # what the loader turns a ``weights`` URL into

    def __init__(self, weights: WeightsFile | bytes | None = None, device: str = "auto", threads: int | None = None,
                 tile: int = DEFAULT_TILE):
        refuse_url(self.name, weights)
        if isinstance(weights, (bytes, bytearray)):
            weights = WeightsFile(bytes(weights), "weights given as bytes")
        weights = weights or bundled_weights(BUNDLED_WEIGHTS)
        if weights is None:
            raise CodecError(f"{NAME}: no weights bundled with this install; pass "
                             f"--codec-options '{{\"weights\": \"PATH\"}}' (train them with `ratefit train`)")
        if not isinstance(tile, int) or isinstance(tile, bool) or tile < 0 or tile % PAD_MULTIPLE:
            raise CodecError(f"{NAME}: tile must be 0 (never tile) or a positive multiple of {PAD_MULTIPLE} "
                             f"pixels, got {tile!r}")
        self.tile = tile
        if threads:
            torch.set_num_threads(int(threads))
        self._device = resolve_device(device)
        self.model, self.weights_sha256, self.weights_metadata = load_model(weights, self._device)
        levels = self.model.config.levels
        self.control = ControlRange("level", -EXTRAPOLATE_BELOW, levels - 1 + EXTRAPOLATE_ABOVE, increasing=True)
        # What fixed-value R-D sweeps (`ratefit eval`, a budget job's probes) span: the trained
        # levels and one beyond each end. The far extrapolated ends serve targets that need them.
        self.capabilities = replace(type(self).capabilities, sweep=(-1.0, float(levels)))
        self._lock = threading.Lock()   # the model's CDF tables and caches are shared state

    @property
    def device(self) -> str:
        return self._device.type

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise CodecError(f"{NAME} expects uint8 HxWx3, got {image.dtype} {image.shape}")
        x = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(self._device)   # copies read-only arrays
        return x.permute(2, 0, 1)[None].float().div_(255.0)

    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> Prepared:
        h, w = image.shape[:2]
        with self._lock:
            y = self.model.analyse(pad_to_multiple(self._to_tensor(image)), self.tile)
        return Prepared(y=y, width=w, height=h)

    @torch.inference_mode()
    def prepare_batch(self, images: list[np.ndarray]) -> list[Prepared]:
        """``prepare`` of several images of one padded size in one pass of the analysis.

        On a GPU one pass over a batch keeps the device busy where single images leave it
        idle between kernels; on a CPU it is no faster (measured: 4 Kodak images, one thread,
        2.8 s one by one, 3.1 s as a batch), so the workers batch only on CUDA. The latents are
        those of ``prepare`` up to the floating-point order of a batched convolution (about 1e-6
        apart), and they code and decode like any other.
        """
        xs = [pad_to_multiple(self._to_tensor(image)) for image in images]
        if len({tuple(x.shape) for x in xs}) != 1:
            raise CodecError(f"{NAME}: a batch needs images of one padded size, got "
                             f"{sorted({tuple(x.shape[-2:]) for x in xs})}")
        with self._lock:
            y = self.model.analyse(torch.cat(xs), self.tile)
        return [Prepared(y=y[i:i + 1], width=image.shape[1], height=image.shape[0]) for i, image in enumerate(images)]

    @torch.inference_mode()
    def estimate(self, prepared: Prepared, value: float) -> float:
        with self._lock:
            # Float32 prices a plain latent within 0.5% of the coder, but refined latents sit on
            # rounding boundaries (that is what refinement pushes them to), where float32 means
            # flip many symbols: their estimates stay float64 (measured: 2 real encodes per item
            # instead of 1 with float32 on refined Kodak crops).
            exact = prepared.refine_steps > 0
            return self.model.estimate_bits(prepared.y, value, dz=prepared.dz, exact=exact) + 8 * _LEN.size

    @torch.inference_mode()
    def estimate_exact(self, prepared: Prepared, value: float) -> float:
        """``estimate`` from the float64 path the coder uses: the search's last check before a
        real encode (the float32 one can be off by a few tenths of a percent, the width of
        the search's window)."""
        with self._lock:
            return self.model.estimate_bits(prepared.y, value, dz=prepared.dz, exact=True) + 8 * _LEN.size

    @torch.inference_mode()
    def encode(self, prepared: Prepared, value: float) -> bytes:
        with self._lock:
            z, y, y_hat = self.model.compress_latent(prepared.y, value, dz=prepared.dz)
            prepared.coded = (value, y_hat)
        return _LEN.pack(len(z)) + z + y

    @torch.inference_mode()
    def reconstruct(self, prepared: Prepared, value: float) -> np.ndarray:
        """What decoding the encode at ``value`` gives, without entropy coding (R-D probes)."""
        with self._lock:
            if prepared.coded is not None and prepared.coded[0] == value:   # the encode's own latent
                x_hat = self.model.synthesise(prepared.coded[1], value, self.tile)
            else:
                x_hat = self.model.reconstruct(prepared.y, value, self.tile, dz=prepared.dz)
        return _to_pixels(x_hat, prepared.width, prepared.height)

    def refine(self, prepared: Prepared, image: np.ndarray, value: float, steps: int) -> Prepared:
        """``prepared`` with latents refined for rate + λ·distortion at ``value`` (``refine.py``).

        The decoder stays as it is: the refined latents go through the same quantisation
        and coding as the analysis' own, so estimate, encode and reconstruct take them
        as they are and every stream still decodes with today's decoder. Windows of
        ``tile`` pixels keep memory bounded on large images.
        """
        if steps <= 0:
            return prepared
        x = pad_to_multiple(self._to_tensor(image))
        with self._lock:
            y, dz = refine_latents(self.model, x, prepared.y, value, steps, prepared.height,
                                   prepared.width, self.tile or DEFAULT_TILE)
        return Prepared(y=y, width=prepared.width, height=prepared.height, dz=dz, refine_steps=steps)

    @torch.inference_mode()
    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
        return self._decode_streams(payload, width, height, value)

    def _decode_streams(self, payload: bytes, width: int, height: int, value: float,
                        level_map: torch.Tensor | None = None) -> np.ndarray:
        """``u32 len(z)`` + z + y back to pixels (per position levels from ``level_map``)."""
        if len(payload) < _LEN.size:
            raise CodecError(f"{self.name} payload of {len(payload)} bytes is too short")
        (zlen,) = _LEN.unpack_from(payload)
        if zlen > len(payload) - _LEN.size:
            raise CodecError(f"{self.name} payload says its z string has {zlen} bytes, only "
                             f"{len(payload) - _LEN.size} follow")
        if not (self.control.low <= value <= self.control.high):
            raise CodecError(f"{self.name} level {value!r} is outside {self.control.low:g}..{self.control.high:g}")
        zh, zw = z_shape_for(height, width)
        cfg = self.model.config
        z = _guarded(payload[_LEN.size:_LEN.size + zlen], cfg.N * zh * zw)
        y = _guarded(payload[_LEN.size + zlen:], cfg.M * 16 * zh * zw)
        with self._lock:
            try:
                x_hat = self.model.decompress_latent(z, y, (zh, zw), value, self._device, self.tile, level_map)
            except (RuntimeError, ValueError) as e:
                raise CodecError(f"{self.name} payload does not decode: {e}") from e
        return _to_pixels(x_hat, width, height)


def _guarded(stream: bytes, symbols: int) -> bytes:
    """``stream`` followed by enough zero words that a corrupt stream never reads past its buffer.

    CompressAI's rANS decoder reads 32-bit words without a bounds check: a valid stream
    ends exactly where its last symbol does, but a truncated or forged one would read on
    into whatever memory follows. Each symbol reads at most one renormalisation word, and
    escape (bypass) runs read at most 15 count nibbles per nibble of real data, so this
    much zero padding holds every read a stream of this length can make; inside the zeros
    the bypass counts end at once. Valid streams decode identically (the tail is unread).
    """
    return stream + bytes(16 * len(stream) + 8 * symbols + 256)


def _to_pixels(x_hat: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Synthesis output (1x3xHpxWp in [0, 1]) cropped to the image, as uint8 HxWx3."""
    x_hat = x_hat[0, :, :height, :width]
    return x_hat.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


CODECS = {NAME: GainHyperpriorCodec}   # named in registry._BUILTIN
