"""Quality metrics between an input and its decoded bitstream (both uint8 HxWx3).

PSNR is over all RGB samples (the convention of the CompressAI/Kodak tables in
../shared/README.md). MS-SSIM uses pytorch-msssim, the implementation CompressAI uses; it
needs both sides of at least 161 px (five scales of an 11-tap window), so smaller images
get ``None``.
"""

from __future__ import annotations

import math

import numpy as np

MS_SSIM_MIN_SIDE = 161


_MSE_ROWS = 256   # rows per chunk: an 8000 px wide image needs ~50 MB of scratch, not three float64 copies


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error, summed exactly in integers over row chunks (bounded memory)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        d = a.astype(np.float64) - b.astype(np.float64)
        return float(np.mean(d * d))
    total = 0
    for r in range(0, a.shape[0], _MSE_ROWS):
        d = (a[r:r + _MSE_ROWS].astype(np.int64) - b[r:r + _MSE_ROWS]).ravel()
        total += int(np.dot(d, d))   # int64 sums of squares: exact
    return total / a.size


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB for 8-bit images; ``inf`` when they are identical."""
    m = mse(a, b)
    return math.inf if m == 0 else 10.0 * math.log10(255.0 ** 2 / m)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """MS-SSIM in [0, 1] on RGB (data range 255), or None for images too small for it."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if min(a.shape[0], a.shape[1]) < MS_SSIM_MIN_SIDE:
        return None
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    def to_tensor(x: np.ndarray) -> "torch.Tensor":
        return torch.from_numpy(np.array(x, dtype=np.float32, copy=True)).permute(2, 0, 1)[None]

    with torch.no_grad():
        return float(_ms_ssim(to_tensor(a), to_tensor(b), data_range=255.0, size_average=True))
