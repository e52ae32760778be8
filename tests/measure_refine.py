"""The README's latent-refinement figures: BD-rate of refined against plain encodes on Kodak.

For each image (a centre crop, to keep a CPU run short) and each fixed rate-control value,
encodes once from the analysis' latents and once from latents refined for that value, and
measures the real stored payload size and the PSNR of the decoded picture. The mean curves
(bpp, PSNR) over the images give a BD-rate; the time per refinement is printed with it.

    .venv/bin/python tests/measure_refine.py ../shared/data/kodak --crop 256 --every 3 --steps 100

Kodak is the evaluation set only; nothing here trains on it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ratefit.codecs.bdrate import bd_rate
from ratefit.codecs.metrics import psnr
from ratefit.codecs.registry import get_codec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kodak")
    p.add_argument("--crop", type=int, default=256, help="centre crop side in pixels (0 = whole image)")
    p.add_argument("--every", type=int, default=3, help="use every n-th image (1 = all 24)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--values", default="0,1.5,3,4.5,6", help="rate-control values (comma-separated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the per-image points here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    codec = get_codec("gain-hyperprior", device="auto")
    values = [float(v) for v in args.values.split(",")]
    files = sorted(Path(args.kodak).glob("kodim*.png"))[:: args.every]
    plain = {v: [] for v in values}
    refined = {v: [] for v in values}
    seconds = []
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"))
        if args.crop:
            h, w = img.shape[:2]
            top, left = (h - args.crop) // 2, (w - args.crop) // 2
            img = img[top:top + args.crop, left:left + args.crop].copy()
        h, w = img.shape[:2]
        prepared = codec.prepare(img)
        for v in values:
            for curve, prep in ((plain, prepared), (refined, None)):
                if prep is None:
                    t0 = time.perf_counter()
                    prep = codec.refine(prepared, img, v, args.steps)
                    seconds.append(time.perf_counter() - t0)
                payload = codec.encode(prep, v)
                curve[v].append((len(payload) * 8 / (h * w), psnr(img, codec.decode(payload, w, h, v))))
        print(f"{f.name}: " + "  ".join(f"v={v:g} {plain[v][-1][0]:.3f}->{refined[v][-1][0]:.3f} bpp "
                                       f"{plain[v][-1][1]:.2f}->{refined[v][-1][1]:.2f} dB" for v in values), flush=True)

    def mean_curve(curve: dict) -> tuple[list[float], list[float]]:
        return ([float(np.mean([b for b, _ in curve[v]])) for v in values],
                [float(np.mean([q for _, q in curve[v]])) for v in values])

    (rp, qp), (rr, qr) = mean_curve(plain), mean_curve(refined)
    bd = bd_rate(rp, qp, rr, qr)
    print(f"\n{len(files)} images, crop {args.crop or 'none'}, {args.steps} steps, device {codec.device}")
    print("| v | plain bpp | plain PSNR | refined bpp | refined PSNR |\n|---|---|---|---|---|")
    for i, v in enumerate(values):
        print(f"| {v:g} | {rp[i]:.3f} | {qp[i]:.2f} | {rr[i]:.3f} | {qr[i]:.2f} |")
    print(f"BD-rate (PSNR) of refined against plain: {100 * bd:+.1f}%; "
          f"refinement {np.mean(seconds):.1f} s per image and value (median {np.median(seconds):.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"values": values, "plain": plain, "refined": refined,
                                               "bd_rate": bd, "seconds": seconds, "steps": args.steps,
                                               "crop": args.crop, "images": [f.name for f in files]}))


if __name__ == "__main__":
    main()
