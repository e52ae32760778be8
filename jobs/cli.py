"""The ``ratefit`` command line: compress, decompress, inspect, codecs, train, eval, report, runs,
manifest, fuzz, export-zoo, bench, demo.

Everything a command line needs lives here: the arguments, merging ``--spec FILE`` with flags
into a JobSpec, the summary printed at the end and the one rule for errors (one line, exit
status 2). The ``python -m ratefit.jobs.compress`` / ``recompress`` / ``decompress``
entrypoints call ``main`` with their command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from ratefit.jobs.spec import JobSpec, SpecError, load_spec_file
from ratefit.jobs.summary import print_summary
from ratefit.workers.storage import redact


def run_guarded(fn: Callable[[], int]) -> int:
    """Run a command, turning expected failures into one clear line and exit status 2."""
    from ratefit.codecs.base import CodecError
    from ratefit.codecs.container import ContainerError
    from ratefit.codecs.weights import WeightsError
    from ratefit.jobs.errors import JobError
    from ratefit.jobs.plan import PlanError
    from ratefit.workers.storage import StorageUnavailable

    try:
        return fn()
    except (SpecError, PlanError, JobError, ContainerError, StorageUnavailable, KeyError, FileNotFoundError,
            CodecError, WeightsError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"ratefit: error: {redact(str(msg))}", file=sys.stderr)
        return 2


def _json_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray, or the cluster "
                                     "that `ray job submit` runs this on)")
    p.add_argument("--workers", type=int, help="a fixed number of codec actors (default: follow the cluster as "
                                               "nodes join and leave: one per CPU, for CUDA codecs up to 8 per GPU)")
    p.add_argument("--min-workers", dest="min_workers", type=int, metavar="N",
                   help="start processing only once N workers are ready (default 1)")
    p.add_argument("--worker-wait", dest="worker_wait_s", type=float, metavar="S",
                   help="how long to wait for --min-workers workers (and, mid-job, for any worker after all "
                        "were lost) before the job stops, resumable (default 600)")
    p.add_argument("--shard-size", type=int, help="items per shard / manifest part (default 16)")
    p.add_argument("--storage-options", type=_json_arg,
                   help='fsspec storage options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:8333"}\'')
    p.add_argument("--storage-retry-s", type=float, help="how long reads and writes ride out a storage outage "
                                                          "before the job stops, resumable (default 120)")
    p.add_argument("--item-timeout", dest="item_timeout_s", type=float, metavar="S",
                   help="seconds one item's read, decode or encode may take: past it the item is an error row "
                        "at its stage, its worker is replaced and the shard goes on (default 600)")
    p.add_argument("--overwrite", action="store_true", default=None, help="discard an earlier run in OUTPUT and start over")
    p.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show the progress bar")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="show neither the progress bar nor progress lines")
    p.add_argument("--progress-every", dest="progress_every_s", type=float, metavar="S",
                   help="where the bar is off (output not a terminal, or CI set): write a progress line to stderr "
                        "every S seconds (default 30)")
    p.add_argument("--in-process", action="store_true", default=None,
                   help="run the shards in this process, one after another, without Ray (small jobs, debugging)")


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="the learned codec's weights: a file or folder URL (local, s3://, https://), "
                                     "or 'zoo' for CompressAI's pretrained downloads (compressai:* codecs)")


def add_decompress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="folder holding .rfic files (a compress OUTPUT)")
    p.add_argument("output", nargs="?", help="folder for the restored PNGs")
    p.add_argument("--max-pixels", type=int, help="refuse containers claiming more pixels than this "
                                                  "(checked before decoding; default 100 MP)")
    p.add_argument("--progressive", type=int, metavar="K",
                   help="decode only the first K latent groups of each stream: a coarser preview from the same "
                        "file (codecs that decode coarse-to-fine: qarv); other codecs' items become error rows")
    add_weights_argument(p)
    add_common_arguments(p)


def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="folder URL (local path, s3://bucket/prefix, ...) or a listing "
                                            "file (.parquet/.csv with a 'uri' column)")
    p.add_argument("output", nargs="?", help="output folder URL")
    p.add_argument("--spec", help="YAML/JSON job spec (any fsspec URL); flags given here override it")
    p.add_argument("--codec", help="codec name (see `ratefit codecs`; default gain-hyperprior)")
    p.add_argument("--codec-options", type=_json_arg, help="codec options as JSON, e.g. '{\"speed\": 8}'")
    add_weights_argument(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-bpp", type=float, help="ceiling in bits per pixel, container included")
    g.add_argument("--target-bytes", type=float, help="ceiling in bytes per stored file")
    g.add_argument("--target-psnr", type=float, help="smallest output reaching this PSNR (dB)")
    g.add_argument("--budget-bytes", type=float, help="one budget for the whole collection, in stored bytes: "
                                                      "spread where it buys the most quality (equal slope)")
    g.add_argument("--budget-bpp", type=float, help="the same budget as total bits over total pixels")
    p.add_argument("--min-psnr", type=float, help="budget jobs: a PSNR floor for every image (dB)")
    p.add_argument("--objective", choices=("psnr", "mse"), help="budget jobs: maximise the mean PSNR (default) "
                                                                "or minimise the total squared error")
    p.add_argument("--probes", type=int, help="budget jobs: R-D probes per image (default 10 for continuous "
                                              "codecs, 12 for discrete ones)")
    p.add_argument("--qmap", help="quality map for spatial codecs (gain-hyperprior-roi): a generator "
                                  "(uniform, center, saliency, faces, text) or a folder of grayscale PNGs mirroring "
                                  "the input (a listing's qmap_uri column wins)")
    p.add_argument("--refine-steps", type=int, help="learned codecs: optimise each image's latents for this many "
                                                    "steps before the final rate search (slower encode, more quality "
                                                    "per byte; the decoder is unchanged; default 0)")
    p.add_argument("--strip-metadata", action="store_true", default=None,
                   help="drop EXIF, XMP and the ICC profile (pixels are converted to sRGB through the profile first); "
                        "by default they travel with the output")
    p.add_argument("--srgb", action="store_true", default=None,
                   help="convert pixels to sRGB through their ICC profile and drop it (EXIF and XMP still travel)")
    p.add_argument("--min-savings", type=float,
                   help="keep an input as it is (status skipped, no output, never retired) unless its result is at "
                        "least this fraction smaller (default 0: strictly smaller)")
    p.add_argument("--layout", choices=["files", "webdataset"],
                   help="files (default): one output object per image, OUTPUT/<path>.<ext>; webdataset: one tar "
                        "per shard, OUTPUT/shards/<run>/shard-NNNNN.tar, each image a member the manifest locates "
                        "(shard_uri, offset, length)")
    p.add_argument("--extensions", help="comma-separated input extensions (default: common image formats)")
    p.add_argument("--max-pixels", type=int, help="refuse inputs above this many pixels (checked before decoding)")
    p.add_argument("--no-ms-ssim", dest="ms_ssim", action="store_false", default=None,
                   help="skip MS-SSIM in the manifest (PSNR is always measured)")
    p.add_argument("--verify", action="store_true", default=None,
                   help="read every stored bitstream back and decode it on the worker; a mismatch is an error row")
    p.add_argument("--retire-originals", action="store_true", default=None,
                   help="delete each original once its bitstream was read back, decoded and checked (--verify) and "
                        "its row committed; a tombstone row under OUTPUT/_retired/ records it. Off by default")
    p.add_argument("--retire-to", help="with --retire-originals: move originals under this folder URL instead of "
                                       "deleting them (implies --retire-originals)")
    add_common_arguments(p)


_FLAG_FIELDS = ("input", "output", "codec", "codec_options", "weights", "target_bpp", "target_bytes", "target_psnr",
                "budget_bytes", "budget_bpp", "min_psnr", "objective", "probes", "qmap", "refine_steps", "strip_metadata", "srgb", "min_savings", "layout", "extensions", "max_pixels", "progressive", "ms_ssim", "verify", "retire_originals", "retire_to", "storage_retry_s", "item_timeout_s", "progress_every_s", "address", "workers", "min_workers", "worker_wait_s", "shard_size", "storage_options",
                "overwrite", "progress", "in_process")


def spec_from_args(args: argparse.Namespace, kind: str = "compress") -> JobSpec:
    """Merge ``--spec FILE`` (if any) with the flags given; flags win."""
    data: dict[str, Any] = {}
    if getattr(args, "spec", None):
        data = load_spec_file(args.spec, getattr(args, "storage_options", None))
    given = {k: getattr(args, k) for k in _FLAG_FIELDS if getattr(args, k, None) is not None}
    if any(k.startswith(("target_", "budget_")) for k in given):
        for k in ("target_bpp", "target_bytes", "target_psnr", "budget_bytes", "budget_bpp"):
            data.pop(k, None)
    data.update(given)
    data["kind"] = kind
    missing = [k for k in ("input", "output") if not data.get(k)]
    if missing:
        raise SpecError(f"missing {' and '.join(missing).upper()}: give them as arguments or in --spec")
    return JobSpec.from_dict(data)


def _inspect(args: argparse.Namespace) -> int:
    import fsspec

    from ratefit.codecs.container import MAGIC, ContainerError, unpack

    status = 0
    for url in args.files:
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
            info = _container_info(unpack(data)[0], data) if data.startswith(MAGIC) else _plain_info(data)
        except (ContainerError, OSError, ValueError) as e:
            print(f"{redact(url)}: error: {e}", file=sys.stderr)
            status = 2
            continue
        print(json.dumps({"file": redact(url), **info}, indent=2))
    return status


def _container_info(header: Any, data: bytes) -> dict[str, Any]:
    return {
        "format_version": header.version, "codec": header.codec,
        "weights_sha256": header.weights_sha256.hex() or None, "rate_param": header.value,
        "width": header.width, "height": header.height, "original_mode": header.mode,
        "header_bytes": header.size, "payload_bytes": header.payload_length,
        "file_bytes": len(data), "bpp": round(len(data) * 8 / (header.width * header.height), 5),
        "crc32": f"{header.crc32:08x}",
        "sections": {tag.decode("ascii", "replace").strip(): len(v) for tag, v in header.sections.items()},
    }


def _plain_info(data: bytes) -> dict[str, Any]:
    """What a plain-file output (AVIF, WebP, JPEG, JPEG XL) says about itself; its codec and rate
    value are in its manifest row."""
    import io

    from PIL import Image, UnidentifiedImageError

    from ratefit.codecs.registry import factory_of

    factory_of("jxl")   # registers the JPEG XL plugin with Pillow
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return {"format": im.format, "width": w, "height": h, "mode": im.mode, "file_bytes": len(data),
                    "bpp": round(len(data) * 8 / (w * h), 5), "has_icc": bool(im.info.get("icc_profile")),
                    "exif_bytes": len(im.info.get("exif") or b""),
                    "xmp_bytes": len(im.info.get("xmp") or b"")}
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a ratefit container nor an image file ({len(data)} bytes, starts {data[:8]!r}): "
                         f"{type(e).__name__}") from None


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


def _print_run(run: Callable[[JobSpec], dict[str, Any]], spec: JobSpec) -> int:
    print_summary(run(spec), spec.output)
    return 0


def main(argv: list[str] | None = None, prog: str = "ratefit") -> int:
    from ratefit.jobs import compress, decompress, history, report
    from ratefit.jobs.tools import bench, demo, evaluate, export_zoo, fuzz, train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog=prog, description="Learned and classical image compression at "
                                "per-item target bitrates, as Ray jobs over any fsspec storage.")
    sub = p.add_subparsers(dest="command", required=True)
    entry = {} if prog == "ratefit" else {"prog": prog}   # `python -m ratefit.jobs.compress --help` reads as typed
    pc = sub.add_parser("compress", help="compress a folder or listing to OUTPUT at a target", **entry)
    add_compress_arguments(pc)
    pd = sub.add_parser("decompress", help="restore PNGs from the .rfic files under INPUT", **entry)
    add_decompress_arguments(pd)
    pi = sub.add_parser("inspect", help="print the header of .rfic files (or what a plain output file says)")
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
    export_zoo.add_export_zoo_arguments(px)
    pb = sub.add_parser("bench", help="the job and a naive one-process loop side by side (or the driver alone)")
    bench.add_bench_arguments(pb)
    pm = sub.add_parser("demo", help="compress and restore the bundled sample photos")
    pm.add_argument("output", nargs="?", default="demo-output")
    pm.add_argument("--target-bpp", type=float, default=0.5)
    args = p.parse_args(argv)

    if args.command == "compress":
        return run_guarded(lambda: _print_run(compress.run, spec_from_args(args)))
    if args.command == "decompress":
        args.spec = None
        return run_guarded(lambda: _print_run(decompress.run, spec_from_args(args, kind="decompress")))
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
        return run_guarded(lambda: export_zoo.run(args))
    if args.command == "demo":
        return run_guarded(lambda: demo.run_demo(args.output, args.target_bpp))
    return 2


if __name__ == "__main__":
    sys.exit(main())
