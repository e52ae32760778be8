"""The ``ratefit`` command line: compress, decompress, inspect, codecs, train, eval, report, runs, manifest, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from ratefit.workers.storage import redact


def run_guarded(fn: Callable[[], int]) -> int:
    """Run a command, turning expected failures into one clear line and exit status 2."""
    from ratefit.codecs.base import CodecError
    from ratefit.codecs.container import ContainerError
    from ratefit.codecs.weights import WeightsError
    from ratefit.jobs.plan import PlanError
    from ratefit.jobs.runner import JobError
    from ratefit.jobs.spec import SpecError
    from ratefit.workers.storage import StorageUnavailable

    try:
        return fn()
    except (SpecError, PlanError, JobError, ContainerError, StorageUnavailable, KeyError, FileNotFoundError,
            CodecError, WeightsError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"ratefit: error: {redact(str(msg))}", file=sys.stderr)
        return 2


def _inspect(args: argparse.Namespace) -> int:
    import fsspec

    from ratefit.codecs.container import ContainerError, unpack

    status = 0
    for url in args.files:
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
            header, _ = unpack(data)
        except (ContainerError, OSError) as e:
            print(f"{redact(url)}: error: {e}", file=sys.stderr)
            status = 2
            continue
        info = {
            "file": redact(url), "format_version": header.version, "codec": header.codec,
            "weights_sha256": header.weights_sha256.hex() or None, "rate_param": header.value,
            "width": header.width, "height": header.height, "original_mode": header.mode,
            "header_bytes": header.size, "payload_bytes": header.payload_length,
            "file_bytes": len(data), "bpp": round(len(data) * 8 / (header.width * header.height), 5),
            "crc32": f"{header.crc32:08x}",
        }
        print(json.dumps(info, indent=2))
    return status


def _codecs(args: argparse.Namespace) -> int:
    from ratefit.codecs.registry import describe, list_codecs

    names = list_codecs()
    width = max(len(n) for n in names) + 1
    print(f"{'name':<{width}} {'control':<8} {'range':<10} {'kind':<11} {'device':<7} {'speed':<6} extension")
    for name in names:
        try:
            d = describe(name)
        except Exception as e:  # e.g. a learned codec whose weights are not installed
            print(f"{name:<{width}} unavailable: {e}")
            continue
        needs = f"   (needs {d['needs']})" if d.get("needs") else ""
        print(f"{name:<{width}} {d['control']:<8} {d['range']:<10} {d['kind']:<11} {d['device']:<7} "
              f"{d['speed']:<6} .{d['extension']}{needs}")
    return 0


def _export_zoo(args: argparse.Namespace) -> int:
    import torch

    from ratefit.codecs.gain_hyperprior import BUNDLED_WEIGHTS, load_model
    from ratefit.codecs.weights import WeightsError, bundled_path
    from ratefit.codecs.zoo_export import export

    url = args.weights or bundled_path(BUNDLED_WEIGHTS)
    if url is None:
        raise WeightsError("no gain-hyperprior weights bundled with this install; pass --weights")
    model, _, _ = load_model(url, torch.device("cpu"))
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


def main(argv: list[str] | None = None) -> int:
    from ratefit.jobs import bench, decompress, demo, evaluate, fuzz, history, recompress, report, train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="ratefit", description="Learned and classical image compression at "
                                "per-item target bitrates, as Ray jobs over any fsspec storage.")
    sub = p.add_subparsers(dest="command", required=True)
    pc = sub.add_parser("compress", help="compress a folder or listing to OUTPUT at a target")
    recompress.add_compress_arguments(pc)
    pd = sub.add_parser("decompress", help="restore PNGs from the .rfic files under INPUT")
    decompress.add_decompress_arguments(pd)
    pi = sub.add_parser("inspect", help="print the header of .rfic files")
    pi.add_argument("files", nargs="+")
    sub.add_parser("codecs", help="list registered codecs")
    pt = sub.add_parser("train", help="train the gain-hyperprior model on a folder of photos")
    train.add_train_arguments(pt)
    pe = sub.add_parser("eval", help="rate-distortion curves and BD-rates of codecs on a folder of photos")
    evaluate.add_eval_arguments(pe)
    pr = sub.add_parser("report", help="an HTML report (plots, summary, errors) of a finished compress job")
    report.add_report_arguments(pr)
    pu = sub.add_parser("runs", help="the runs of a compress OUTPUT: planned, new, changed, unchanged, saved")
    history.add_runs_arguments(pu)
    pn = sub.add_parser("manifest", help="the current state of a compress OUTPUT: one row per input, print or export")
    history.add_manifest_arguments(pn)
    pf = sub.add_parser("fuzz", help="fuzz the container parser and decoders for a while (crashes, hangs)")
    fuzz.add_fuzz_arguments(pf)
    px = sub.add_parser("export-zoo", help="write the gain-hyperprior model as CompressAI zoo checkpoints")
    px.add_argument("output", help="local folder for the checkpoints")
    px.add_argument("--weights", help="gain-hyperprior weights (default: the bundled ones)")
    px.add_argument("--kind", choices=("mbt2018-mean", "mbt2018-mean-vbr", "bmshj2018-hyperprior"),
                    default="mbt2018-mean", help="mbt2018-mean: one network per level (exact); mbt2018-mean-vbr: "
                    "one approximate VBR network; bmshj2018-hyperprior: a scale-only hyperprior fitted on --photos")
    px.add_argument("--levels", help="comma-separated levels to export (quality = level + 1; default all)")
    px.add_argument("--photos", help="bmshj2018-hyperprior: folder of training photos (never Kodak)")
    px.add_argument("--steps", type=int, default=3000, help="bmshj2018-hyperprior: fitting steps")
    pb = sub.add_parser("bench", help="the job and a naive one-process loop side by side (or the driver alone)")
    bench.add_bench_arguments(pb)
    pm = sub.add_parser("demo", help="compress and restore the bundled sample photos")
    pm.add_argument("output", nargs="?", default="demo-output")
    pm.add_argument("--target-bpp", type=float, default=0.5)
    args = p.parse_args(argv)

    if args.command == "compress":
        return run_guarded(lambda: recompress._run_and_print(recompress.spec_from_args(args)))
    if args.command == "decompress":
        def go() -> int:
            spec = decompress.spec_for(args)
            recompress.print_summary(decompress.run(spec), spec.output)
            return 0
        return run_guarded(go)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "codecs":
        return _codecs(args)
    if args.command == "eval":
        return evaluate.run(args)
    if args.command == "train":
        return train.run(args)
    if args.command == "report":
        return run_guarded(lambda: report.run(args))
    if args.command == "runs":
        return run_guarded(lambda: history.runs(args))
    if args.command == "manifest":
        return run_guarded(lambda: history.manifest(args))
    if args.command == "fuzz":
        return fuzz.run(args)
    if args.command == "bench":
        return run_guarded(lambda: bench.run(args))
    if args.command == "export-zoo":
        return run_guarded(lambda: _export_zoo(args))
    if args.command == "demo":
        return run_guarded(lambda: demo.run_demo(args.output, args.target_bpp))
    return 2


if __name__ == "__main__":
    sys.exit(main())
