"""Entrypoint of the recompression job.

    python -m ratefit.jobs.recompress --spec job.yaml            # e.g. under `ray job submit`
    python -m ratefit.jobs.recompress INPUT OUTPUT --target-bpp 0.5
    ratefit.jobs.recompress.run(JobSpec(...))                     # from Python

All three build one JobSpec and call ``run``: plan → shards → actors → manifest → _SUCCESS.
Every call is one incremental run (``jobs/incremental.py``): it plans only the inputs that
are new or changed since the runs before it, so the same command, run nightly, keeps a
growing archive compressed, and a killed run is finished by the next.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterator

from ratefit.codecs.registry import preferred_device
from ratefit.jobs import incremental
from ratefit.jobs.plan import iter_folder, iter_listing
from ratefit.jobs.spec import JobSpec, SpecError, load_spec_file
from ratefit.workers.items import Item


def plan_items(spec: JobSpec) -> Iterator[Item]:
    if spec.is_listing:
        return iter_listing(spec.input, spec.storage_options)
    return iter_folder(spec.input, spec.extensions, spec.storage_options, skip_url=spec.output)


def run(spec: JobSpec) -> dict[str, Any]:
    """Compress every input of ``spec`` and return the ``_SUCCESS`` summary."""
    if spec.kind != "compress":
        raise SpecError("recompress.run needs a spec of kind 'compress'")
    if spec.is_budget:
        from ratefit.jobs import budget

        return budget.run(spec, plan_items)
    # The codec is built on the workers only: the runner waits for them to start and turns a
    # codec that cannot be built (bad options, missing weights) into one JobError, before
    # anything is written to OUTPUT. The driver never loads a model.
    device = preferred_device(spec.codec, **spec.codec_kwargs())
    return incremental.run(spec, plan_items(spec), device)


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
    p.add_argument("--workers", type=int, help="number of codec actors (default: one per CPU, or per GPU "
                                               "for GPU codecs)")
    p.add_argument("--shard-size", type=int, help="items per shard / manifest part (default 16)")
    p.add_argument("--storage-options", type=_json_arg,
                   help='fsspec storage options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:8333"}\'')
    p.add_argument("--storage-retry-s", type=float, help="how long reads and writes ride out a storage outage "
                                                          "before the job stops, resumable (default 120)")
    p.add_argument("--overwrite", action="store_true", default=None, help="discard an earlier run in OUTPUT and start over")
    p.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show the progress bar")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never show the progress bar")


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="the learned codec's weights: a file or folder URL (local, s3://, https://), "
                                     "or 'zoo' for CompressAI's pretrained downloads (compressai:* codecs)")


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
                "budget_bytes", "budget_bpp", "min_psnr", "objective", "probes", "qmap", "refine_steps", "extensions", "max_pixels", "ms_ssim", "verify", "retire_originals", "retire_to", "storage_retry_s", "address", "workers", "shard_size", "storage_options",
                "overwrite", "progress")


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


def print_summary(summary: dict[str, Any], output: str) -> None:
    s = summary
    parts = [f"{s['items']} items: " + ", ".join(f"{n} {k}" for k, n in sorted(s["statuses"].items()))]
    if s.get("mean_bpp") is not None:
        parts.append(f"mean {s['mean_bpp']:.3f} bpp, {s['mean_psnr']:.2f} dB PSNR" if s.get("mean_psnr") is not None
                     else f"mean {s['mean_bpp']:.3f} bpp")
    if s["input_bytes"]:
        parts.append(f"{s['input_bytes'] / 1e6:.2f} MB in, {s['output_bytes'] / 1e6:.2f} MB out")
    parts.append(f"{s['wall_s']:.1f} s")
    if s.get("budget"):
        b = s["budget"]
        print(f"budget {b['budget_bytes']:.0f} bytes ({b['budget_bpp']:.4f} bpp): used {b['achieved_bytes']:.0f} "
              f"({b['achieved_fraction']:.2%}); predicted mean PSNR {b['predicted_mean_psnr']:.2f} dB "
              f"(uniform rate: {b['uniform_predicted_mean_psnr']:.2f} dB); {b['corrected_items']} item(s) corrected")
    if "verify_failures" in s:
        parts.append(f"{s['verified_items']} verified, {s['verify_failures']} verify failure(s)")
    if s["resumed_shards"]:
        parts.append(f"{s['resumed_shards']} shard(s) resumed from an earlier run")
    print("; ".join(parts))
    if "run_id" in s:
        st = s["state"]
        print(f"run {s['run_id']}: {s['new_items']} new, {s['changed_items']} changed, {s['retried_items']} retried, "
              f"{s['unchanged_items']} unchanged (left out); {s['saved_bytes'] / 1e6:.2f} MB saved"
              + (f", {s['retired_items']} original(s) retired" if s.get("retired_items") else "")
              + f"; now {st['inputs']} inputs ({', '.join(f'{n} {k}' for k, n in sorted(st['statuses'].items()))})")
    print(f"manifest: {output.rstrip('/')}/_manifest/   summary: {output.rstrip('/')}/_SUCCESS")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ratefit.jobs.recompress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_compress_arguments(p)
    args = p.parse_args(argv)
    from ratefit.jobs.cli import run_guarded

    return run_guarded(lambda: _run_and_print(spec_from_args(args)))


def _run_and_print(spec: JobSpec) -> int:
    summary = run(spec)
    print_summary(summary, spec.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
