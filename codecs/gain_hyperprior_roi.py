"""``gain-hyperprior-roi``: the default model with a quality map (regions of interest).

The same network and weights as ``gain-hyperprior``, with one rate level per latent
position instead of one per image: where the quality map ``q`` is 1 the latent is coded
at the control value ``v``, where it is 0 at ``v - span``, linearly in between (log-linear
in the gains, as between the model's trained levels). The per-item target still holds:
rate control searches ``v``, i.e. the map's offset, with the map's shape fixed.

This is spatial rate control without a retrained network (spatially varying gains, as in
the spatial-channel variant of Gained VAE, or QVRF's quantisation step made per-position).
The map travels in the payload as a grid of 32 px cells at 16 levels (zlib: a few dozen
bytes for a smooth map), so the decoder needs no map. Only y's gains follow the map; the
hyper-latent, scales and means stay at the scalar ``v``, so the map cannot desynchronise
the entropy coder across devices.

Payload: ``f32 span`` + map grid (``codecs/qmap.pack_grid``) + the ``gain-hyperprior``
payload (``u32 len(z)`` + z + y). Header: image size, ``v``, the weights' SHA-256.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace

import numpy as np
import torch

from ratefit.codecs import qmap as qmaps
from ratefit.codecs.base import CodecError
from ratefit.codecs.gain_hyperprior import _LEN, GainHyperpriorCodec, Prepared, _to_pixels
from ratefit.codecs.gained import PAD_MULTIPLE

NAME = "gain-hyperprior-roi"
DEFAULT_SPAN = 3.0     # rate levels between q = 1 and q = 0 (each level halves λ)
MAX_SPAN = 9.0         # the whole range of the model's levels
_SPAN = struct.Struct("<f")


@dataclass
class RoiPrepared(Prepared):
    grid: np.ndarray | None = None      # the coded map (rows x cols, 0..15)
    side: bytes = b""                   # span + packed grid, as the payload starts


class GainHyperpriorRoiCodec(GainHyperpriorCodec):
    """``gain-hyperprior`` with a per-image quality map handed to ``prepare``."""

    name = NAME
    extension = "ghr.rfic"
    # The workers pass a quality map to prepare(); latent refinement optimises one level per
    # image, not a map (not yet), so it is not declared (and the inherited method is hidden).
    capabilities = replace(GainHyperpriorCodec.capabilities, spatial=True, refine=False, batch=False)
    refine = None

    def __init__(self, *args, span: float = DEFAULT_SPAN, **kwargs):
        if isinstance(span, bool) or not isinstance(span, (int, float)) or not (0 <= span <= MAX_SPAN):
            raise CodecError(f"{NAME}: span must be a number of rate levels in 0..{MAX_SPAN:g}, got {span!r}")
        self.span = float(_SPAN.unpack(_SPAN.pack(span))[0])   # what the payload will carry
        super().__init__(*args, **kwargs)

    def level_map(self, grid: np.ndarray, value: float, span: float) -> torch.Tensor:
        """Per latent position levels: ``value - span * (1 - q)``, each cell over 2 x 2 latents."""
        steps = 1.0 - torch.from_numpy(grid.astype(np.float64)) / (qmaps.MAP_LEVELS - 1)
        per_cell = float(value) - span * steps
        up = qmaps.CELL // 16    # latent positions per cell side
        return per_cell.repeat_interleave(up, 0).repeat_interleave(up, 1).to(self._device)

    @torch.inference_mode()
    def prepare(self, image: np.ndarray, qmap: np.ndarray | None = None) -> RoiPrepared:
        base = super().prepare(image)
        h, w = image.shape[:2]
        if qmap is None:
            qmap = np.ones((h, w), np.float32)
        if qmap.shape != (h, w):
            raise CodecError(f"{NAME}: quality map is {qmap.shape[1]}x{qmap.shape[0]}, the image {w}x{h}")
        grid = qmaps.to_grid(qmap, PAD_MULTIPLE)
        return RoiPrepared(y=base.y, width=w, height=h, grid=grid,
                           side=_SPAN.pack(self.span) + qmaps.pack_grid(grid))

    @torch.inference_mode()
    def estimate(self, prepared: RoiPrepared, value: float) -> float:
        field = self.level_map(prepared.grid, value, self.span)
        with self._lock:
            return (self.model.estimate_bits(prepared.y, value, field, exact=False)
                    + 8 * (len(prepared.side) + _LEN.size))

    @torch.inference_mode()
    def estimate_exact(self, prepared: RoiPrepared, value: float) -> float:
        field = self.level_map(prepared.grid, value, self.span)
        with self._lock:
            return (self.model.estimate_bits(prepared.y, value, field, exact=True)
                    + 8 * (len(prepared.side) + _LEN.size))

    @torch.inference_mode()
    def encode(self, prepared: RoiPrepared, value: float) -> bytes:
        field = self.level_map(prepared.grid, value, self.span)
        with self._lock:
            z, y, y_hat = self.model.compress_latent(prepared.y, value, field)
            prepared.coded = (value, y_hat)
        return prepared.side + _LEN.pack(len(z)) + z + y

    @torch.inference_mode()
    def reconstruct(self, prepared: RoiPrepared, value: float) -> np.ndarray:
        field = self.level_map(prepared.grid, value, self.span)
        with self._lock:
            if prepared.coded is not None and prepared.coded[0] == value:   # the encode's own latent
                x_hat = self.model.synthesise(prepared.coded[1], value, self.tile, field)
            else:
                x_hat = self.model.reconstruct(prepared.y, value, self.tile, field)
        return _to_pixels(x_hat, prepared.width, prepared.height)

    def coded_map(self, payload: bytes, width: int, height: int) -> tuple[np.ndarray, float, int]:
        """The quality map a payload carries (grid cells, 0..15), its span and the bytes both took."""
        if len(payload) < _SPAN.size:
            raise CodecError(f"{NAME} payload of {len(payload)} bytes is too short")
        (span,) = _SPAN.unpack_from(payload)
        if not (math.isfinite(span) and 0 <= span <= MAX_SPAN):
            raise CodecError(f"{NAME} payload's span {span!r} is outside 0..{MAX_SPAN:g}")
        rows, cols = qmaps.grid_shape(height, width, PAD_MULTIPLE)
        try:
            grid, used = qmaps.unpack_grid(payload[_SPAN.size:], rows, cols)
        except qmaps.QmapError as e:
            raise CodecError(f"{NAME} payload: {e}") from None
        return grid, span, _SPAN.size + used

    @torch.inference_mode()
    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
        grid, span, used = self.coded_map(payload, width, height)
        field = self.level_map(grid, value, span)
        return self._decode_streams(payload[used:], width, height, value, field)


CODECS = {NAME: GainHyperpriorRoiCodec}   # named in registry._BUILTIN
