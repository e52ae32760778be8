"""``ratefit eval DIR --codecs a,b,…``: rate–distortion curves and BD-rates on a folder of photos.

Each codec is run at a fixed set of rate-control values (the same value for every image, as
published R-D curves are made): a default quality list for the discrete codecs, evenly
spaced levels for continuous ones, or ``--values codec=v1,v2,…``. Every point is a real
encode into a ratefit container and a real decode; bpp counts the stored file (header
included), PSNR is on RGB over the whole image, MS-SSIM as in the manifests. Points are
averaged over images per value. Outputs in ``--out``: ``points.json`` (per image and mean
points), ``bd_rate.json`` (every codec against AVIF, WebP and JPEG where they were run),
``rd.png`` (PSNR and MS-SSIM against bpp), and a printed table.

``--refine-steps N`` adds, for each codec with latent refinement, a curve named
``<codec>+refine<N>``: the same values, with each image's latents refined for that value
before encoding; its BD-rates include one against the codec's own plain curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ratefit.codecs import container
from ratefit.codecs.base import capabilities_of, payload_weights_sha256
from ratefit.codecs.bdrate import bd_rate
from ratefit.codecs.metrics import ms_ssim, psnr
from ratefit.workers.codec_loader import load_codec

ANCHORS = ("avif", "webp", "jpeg")
DEFAULT_VALUES = {
    "jpeg": [10, 25, 40, 55, 70, 85, 92],
    "webp": [5, 20, 40, 60, 75, 88, 95],
    "avif": [20, 35, 50, 60, 70, 80, 88],
    "jxl": [20, 40, 55, 70, 80, 88, 94],
}
CONTINUOUS_POINTS = 8
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")

_codecs: dict[str, Any] = {}


def _init_worker(codec_options: dict[str, dict], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _codecs.clear()
    for name, opts in codec_options.items():
        _codecs[name] = load_codec(name, **opts)


REFINED = "+refine"


def refined_name(name: str, steps: int) -> str:
    return f"{name}{REFINED}{steps}"


def _evaluate_image(path: str, plan: dict[str, list[float]], refine_steps: int = 0) -> list[dict[str, Any]]:
    from ratefit.workers.read import decode_image

    image = decode_image(Path(path).read_bytes()).pixels
    h, w = image.shape[:2]
    rows = []
    for name, values in plan.items():
        codec = _codecs[name]
        t0 = time.perf_counter()
        prepared = codec.prepare(image)
        prep_s = time.perf_counter() - t0
        refine = bool(refine_steps) and capabilities_of(codec).refine
        for label, steps in ((name, 0),) + (((refined_name(name, refine_steps), refine_steps),) if refine else ()):
            for value in values:
                t0 = time.perf_counter()
                coded = codec.refine(prepared, image, value, steps) if steps else prepared
                payload = codec.encode(coded, value)
                enc_s = time.perf_counter() - t0
                blob = payload if capabilities_of(codec).plain_file else container.pack(
                    name, payload, value=value, width=w, height=h, weights_sha256=payload_weights_sha256(codec, payload))
                t0 = time.perf_counter()
                restored = codec.decode(payload, w, h, value)
                dec_s = time.perf_counter() - t0
                rows.append({"image": Path(path).name, "codec": label, "value": float(value),
                             "bpp": len(blob) * 8 / (w * h), "psnr": psnr(image, restored),
                             "ms_ssim": ms_ssim(image, restored), "encode_s": enc_s + prep_s / len(values),
                             "decode_s": dec_s})
    return rows


def values_for(name: str, codec: Any, override: dict[str, list[float]]) -> list[float]:
    if name in override:
        return override[name]
    if capabilities_of(codec).lossless:   # one point: its rate (PSNR inf)
        return [float(codec.control.low)]
    if name in DEFAULT_VALUES:
        return [float(v) for v in DEFAULT_VALUES[name]]
    c = codec.control
    if c.discrete:
        return [float(v) for v in np.unique(np.round(np.linspace(c.low, c.high, CONTINUOUS_POINTS)))]
    low, high = capabilities_of(codec).sweep or (c.low, c.high)   # a codec may sweep less than its whole range
    return [float(v) for v in np.linspace(low, high, CONTINUOUS_POINTS)]


def mean_points(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {}
    for name in dict.fromkeys(r["codec"] for r in rows):
        pts = []
        for value in sorted({r["value"] for r in rows if r["codec"] == name}):
            sel = [r for r in rows if r["codec"] == name and r["value"] == value]
            finite = [r["psnr"] for r in sel if math.isfinite(r["psnr"])]
            ms = [r["ms_ssim"] for r in sel if r["ms_ssim"] is not None]
            pts.append({"value": value, "images": len(sel), "bpp": float(np.mean([r["bpp"] for r in sel])),
                        "psnr": float(np.mean(finite)) if finite else math.inf,
                        "ms_ssim": float(np.mean(ms)) if ms else math.nan,
                        "encode_s": float(np.mean([r["encode_s"] for r in sel])),
                        "decode_s": float(np.mean([r["decode_s"] for r in sel]))})
        out[name] = pts
    return out


def bd_table(points: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float | None]]:
    table: dict[str, dict[str, float | None]] = {}
    for name, pts in points.items():
        table[name] = {}
        plain = name.partition(REFINED)[0]
        for anchor in ANCHORS + ((plain,) if plain != name else ()):
            if anchor == name or anchor not in points:
                continue
            a = points[anchor]
            try:
                v = bd_rate([p["bpp"] for p in a], [p["psnr"] for p in a],
                            [p["bpp"] for p in pts], [p["psnr"] for p in pts])
            except ValueError:
                v = math.nan
            table[name][anchor] = None if math.isnan(v) else v
    return table


def plot(points: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, pts in points.items():
        pts = [p for p in pts if math.isfinite(p["psnr"])]   # a lossless codec's one point has no PSNR to plot
        if not pts:
            continue
        bpp = [p["bpp"] for p in pts]
        axes[0].plot(bpp, [p["psnr"] for p in pts], marker="o", label=name)
        axes[1].plot(bpp, [p["ms_ssim"] for p in pts], marker="o", label=name)
    axes[0].set_ylabel("PSNR RGB (dB)")
    axes[1].set_ylabel("MS-SSIM")
    for ax in axes:
        ax.set_xlabel("bits per pixel (stored file)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_values(items: list[str]) -> dict[str, list[float]]:
    out = {}
    for item in items or []:
        name, _, vals = item.partition("=")
        if not vals:
            raise SystemExit(f"ratefit eval: --values takes codec=v1,v2,..., got {item!r}")
        out[name] = [float(v) for v in vals.split(",")]
    return out


def run(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise SystemExit(f"ratefit eval: no images in {folder}")
    names = [n.strip() for n in args.codecs.split(",") if n.strip()]
    codec_options = {n: {} for n in names}
    for item in args.codec_options or []:
        name, _, js = item.partition("=")
        codec_options.setdefault(name, {}).update(json.loads(js))
    codec_options = {n: codec_options[n] for n in names}
    override = _parse_values(args.values)
    refine_steps = getattr(args, "refine_steps", 0) or 0
    local = {n: load_codec(n, **codec_options[n]) for n in names}   # fails fast on bad names/options
    plan = {n: values_for(n, local[n], override) for n in names}
    workers = max(1, args.workers or os.cpu_count() or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"evaluating {', '.join(names)} on {len(files)} images from {folder} with {workers} processes",
          flush=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(codec_options, 1)) as pool:
        for i, image_rows in enumerate(pool.map(_evaluate_image, files, [plan] * len(files),
                                                [refine_steps] * len(files)), 1):
            rows.extend(image_rows)
            print(f"  {i}/{len(files)} images", end="\r" if sys.stdout.isatty() else "\n", flush=True)
    points = mean_points(rows)
    table = bd_table(points)
    meta = {"dir": str(folder), "images": len(files), "refine_steps": refine_steps, "codecs": {n: {"options": codec_options[n],
            "weights_sha256": local[n].weights_sha256.hex() or None} for n in names},
            "seconds": time.perf_counter() - t0, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"), "bpp": "stored ratefit container, header included",
            "psnr": "RGB, mean over images of per-image PSNR"}
    (out / "points.json").write_text(json.dumps({"meta": meta, "mean": points, "per_image": rows}, indent=1))
    (out / "bd_rate.json").write_text(json.dumps(table, indent=1))
    plot(points, out / "rd.png", f"{folder.name}: {len(files)} images")
    print_report(points, table)
    print(f"wrote {out}/points.json, bd_rate.json, rd.png ({meta['seconds']:.0f} s)")
    return 0


def print_report(points: dict[str, list[dict[str, float]]], table: dict[str, dict[str, float | None]]) -> None:
    for name, pts in points.items():
        print(f"{name}: " + "  ".join(f"{p['bpp']:.3f}/{p['psnr']:.2f}" for p in pts))
    anchors = [a for a in ANCHORS if a in points]
    if any(REFINED in n for n in points):
        anchors.append("plain")
    if anchors:
        print(f"{'BD-rate (PSNR)':<28}" + "".join(f"{'vs ' + a:>10}" for a in anchors))
        for name, row in table.items():
            row = dict(row, plain=row.get(name.partition(REFINED)[0]))
            print(f"{name:<28}" + "".join(f"{'' if row.get(a) is None else f'{row[a] * 100:+.1f}%':>10}"
                                          for a in anchors))


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder of photos (e.g. ../shared/data/kodak)")
    p.add_argument("--codecs", default="gain-hyperprior,avif,webp,jpeg", help="comma-separated codec names")
    p.add_argument("--codec-options", action="append", metavar="NAME=JSON",
                   help="options for one codec, e.g. gain-hyperprior='{\"weights\": \"w.safetensors\"}'")
    p.add_argument("--values", action="append", metavar="NAME=V1,V2,...", help="rate-control values for a codec")
    p.add_argument("--out", default="eval-output", help="folder for points.json, bd_rate.json, rd.png")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    p.add_argument("--limit", type=int, default=0, help="first N images only")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="also evaluate codecs with latent refinement at this many steps (a '+refine<N>' curve)")
