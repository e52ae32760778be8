"""``ratefit export-zoo``: the gain-hyperprior model as CompressAI zoo checkpoints, so the
zoo codecs (and CompressAI itself) can run ratefit's trained weights."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_export_zoo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="local folder for the checkpoints")
    p.add_argument("--weights", help="gain-hyperprior weights (default: the bundled ones)")
    p.add_argument("--kind", choices=("mbt2018-mean", "mbt2018-mean-vbr", "bmshj2018-hyperprior"),
                   default="mbt2018-mean", help="mbt2018-mean: one network per level (exact); mbt2018-mean-vbr: "
                   "one approximate VBR network; bmshj2018-hyperprior: a scale-only hyperprior fitted on --photos")
    p.add_argument("--levels", help="comma-separated levels to export (quality = level + 1; default all)")
    p.add_argument("--photos", help="bmshj2018-hyperprior: folder of training photos (never Kodak)")
    p.add_argument("--steps", type=int, default=3000, help="bmshj2018-hyperprior: fitting steps")


def run(args: argparse.Namespace) -> int:
    import torch

    from ratefit.codecs.gain_hyperprior import BUNDLED_WEIGHTS, load_model
    from ratefit.codecs.weights import WeightsError, bundled_weights
    from ratefit.codecs.zoo_export import export
    from ratefit.workers.codec_loader import read_weights_file

    weights = read_weights_file(args.weights) if args.weights else bundled_weights(BUNDLED_WEIGHTS)
    if weights is None:
        raise WeightsError("no gain-hyperprior weights bundled with this install; pass --weights")
    model, _, _ = load_model(weights, torch.device("cpu"))
    levels = [int(x) for x in args.levels.split(",")] if args.levels else None
    if args.kind == "bmshj2018-hyperprior" and levels is None:
        levels = list(range(model.config.levels))
    photos = None
    if args.photos:
        photos = sorted(str(p) for p in Path(args.photos).iterdir()
                        if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for path in export(model, args.output, args.kind, levels, photos, args.steps, log=print):
        print(path)
    return 0
