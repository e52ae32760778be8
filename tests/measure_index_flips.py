"""Why the entropy path runs in float64: count scale-index flips under small relative errors.

A GPU and a CPU compute the hyper-synthesis with different rounding; a flipped scale-table
index desynchronises the rANS decoder. This perturbs the decoder-side scales by relative
errors of 1e-7..1e-5 (float32 cross-device differences are around 1e-6; float64 ones around
1e-15) and counts how many of an image's indexes change.

    .venv/bin/python tests/measure_index_flips.py [WEIGHTS] [KODAK_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ratefit.codecs.gain_hyperprior import GainHyperpriorCodec
from ratefit.workers.codec_loader import read_weights_file


def main() -> None:
    weights = sys.argv[1] if len(sys.argv) > 1 else None
    kodak = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).resolve().parents[2] / "shared/data/kodak")
    codec = GainHyperpriorCodec(weights=read_weights_file(weights) if weights else None, device="cpu")
    model = codec.model
    torch.manual_seed(0)
    eps_list = (1e-7, 1e-6, 1e-5)
    flips = {eps: [] for eps in eps_list}
    files = sorted(kodak.glob("kodim*.png"))
    for f in files:
        prepared = codec.prepare(np.asarray(Image.open(f).convert("RGB")))
        with torch.no_grad():
            for v in np.linspace(codec.control.low, codec.control.high, 5):
                _, z_g, _ = model._hyper(prepared.y, v)
                eb = model.entropy_bottleneck
                z_hat = eb.decompress(eb.compress(z_g), z_g.shape[-2:])
                _, _, scales = model._entropy_params(z_hat, v)
                ref = model.gaussian_conditional.build_indexes(scales)
                for eps in eps_list:
                    noisy = scales * (1 + eps * torch.randn_like(scales))
                    flips[eps].append(int((model.gaussian_conditional.build_indexes(noisy) != ref).sum()))
    print(f"{len(files)} images x 5 levels, {ref.numel()} y symbols each")
    for eps in eps_list:
        print(f"relative error {eps:g}: {np.mean(flips[eps]):.2f} index flips per image and level "
              f"(max {max(flips[eps])}); a single flip makes the rest of the y stream undecodable")


if __name__ == "__main__":
    main()
